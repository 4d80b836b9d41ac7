// The OpenAI JS SDK (openai) against the OpenAI-compatible door, with its default retries (2), as
// its users call it: one images.edit per prompt. Prints, per prompt, the outcome: the image, or the
// error's status, message and x-should-retry header.
// Usage: node openai.js BASE_URL API_KEY IMAGE_PATH PROMPT...  -> prints a JSON summary on stdout.
const fs = require("node:fs");
const OpenAI = require("openai");

async function main() {
  const [baseUrl, apiKey, imagePath, ...prompts] = process.argv.slice(2);
  const client = new OpenAI({ apiKey, baseURL: `${baseUrl}/v1` });
  const outcomes = [];
  for (const prompt of prompts) {
    try {
      const image = await OpenAI.toFile(fs.createReadStream(imagePath), "in.png", { type: "image/png" });
      const out = await client.images.edit({ model: "qwen-image-edit", image, prompt, size: "256x256" });
      outcomes.push({ prompt, ok: true, images: out.data.length, url: out.data[0].url ?? null });
    } catch (err) {
      outcomes.push({
        prompt,
        ok: false,
        status: err.status ?? null,
        message: String(err.message),
        shouldRetry: err.headers ? (err.headers.get ? err.headers.get("x-should-retry") : err.headers["x-should-retry"]) : null,
      });
    }
  }
  console.log(JSON.stringify({ outcomes }));
}

main().catch((err) => {
  console.error(String(err && err.stack ? err.stack : err));
  process.exit(1);
});
