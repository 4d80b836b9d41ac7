// The vendor's MCP server (@wavespeed/mcp) driven by an MCP client (@modelcontextprotocol/sdk), as an
// agent uses it: list_models, get_model_schema, run_model, get_prediction, get_price, get_balance. Only WAVESPEED_BASE_URL points it here.
// Usage: node mcp.js BASE_URL API_KEY IMAGE_DATA_URI  -> prints a JSON summary on stdout.
const path = require("node:path");
const { Client } = require("@modelcontextprotocol/sdk/client/index.js");
const { StdioClientTransport } = require("@modelcontextprotocol/sdk/client/stdio.js");

function payload(result) {
  if (result.isError) throw new Error(result.content.map((c) => c.text).join("\n"));
  return JSON.parse(result.content[0].text);
}

async function main() {
  const [baseUrl, apiKey, image] = process.argv.slice(2);
  const transport = new StdioClientTransport({
    command: process.execPath,
    args: [path.join(__dirname, "node_modules", "@wavespeed", "mcp", "dist", "index.js")],
    env: { ...process.env, WAVESPEED_API_KEY: apiKey, WAVESPEED_BASE_URL: baseUrl },
    stderr: "inherit",
  });
  const client = new Client({ name: "qwen-edit-tests", version: "1.0.0" });
  await client.connect(transport);
  try {
    const tools = (await client.listTools()).tools.map((t) => t.name);
    const listed = payload(await client.callTool({ name: "list_models", arguments: { query: "qwen", refresh: true } }));
    const model = listed.models[0].model_id;
    const schema = payload(await client.callTool({ name: "get_model_schema", arguments: { model } }));
    const input = { prompt: "make it blue", image, size: "256*256" };
    const ran = payload(await client.callTool({ name: "run_model", arguments: { model, input, wait_seconds: 120 } }));
    const fetched = payload(await client.callTool({ name: "get_prediction", arguments: { id: ran.id } }));
    const price = payload(await client.callTool({ name: "get_price", arguments: { model, input } }));
    const balance = payload(await client.callTool({ name: "get_balance", arguments: {} }));
    console.log(JSON.stringify({ tools, listed, schema, ran, fetched, price, balance }));
  } finally {
    await client.close();
  }
}

main().catch((err) => {
  console.error(String(err && err.stack ? err.stack : err));
  process.exit(1);
});
