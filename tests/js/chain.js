// A three-step chained edit with the official JS SDK (wavespeed 0.3.2), as its users write it:
// upload a picture, edit it, then edit the output of each edit again. Only the base URL changes.
// Usage: node chain.js BASE_URL API_KEY IMAGE_PATH sync|async  -> prints a JSON summary on stdout.
const { Client } = require("wavespeed");

async function main() {
  const [baseUrl, apiKey, imagePath, mode] = process.argv.slice(2);
  const client = new Client(apiKey, { baseUrl, maxRetries: 0 });
  const options = { enableSyncMode: mode === "sync", pollInterval: 0.2, timeout: 300 };
  let image = await client.upload(imagePath);
  const steps = [image];
  for (const prompt of ["make it blue", "add a hat", "turn it into a watercolor"]) {
    const out = await client.run("wavespeed-ai/qwen-image/edit", { prompt, image, size: "256*256" }, options);
    image = out.outputs[0];
    steps.push(image);
  }
  console.log(JSON.stringify({ steps }));
}

main().catch((err) => {
  console.error(String(err && err.stack ? err.stack : err));
  process.exit(1);
});
