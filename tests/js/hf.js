// @huggingface/inference's wavespeed provider, pointed here by its own `urlTransform` option (the
// supported way to change a provider's base URL). The Hub lookup that maps the Hub model id to the
// provider's id (huggingface.co/api/models/...) is answered by a custom `fetch` (also an option of the
// client) with the mapping the Hub publishes, since the tests run offline; everything else is real.
// The job runs long enough that the client polls more than once, as it always does against a GPU.
// Its wait between polls (4.13.30, utils/delay.js) is an unref'd timer, so a script with nothing else
// keeping Node's event loop alive exits with status 0 and no result mid-job (against the hosted API
// too). A long-lived app has its own handles; this script holds one while the call is in flight.
// Usage: node hf.js BASE_URL API_KEY IMAGE_PATH  -> prints a JSON summary on stdout.
const fs = require("node:fs");
const { InferenceClient } = require("@huggingface/inference");

const HUB_MAPPING = {
  inferenceProviderMapping: {
    wavespeed: { status: "live", providerId: "wavespeed-ai/qwen-image/edit", task: "image-to-image" },
  },
};

async function main() {
  const [baseUrl, apiKey, imagePath] = process.argv.slice(2);
  const hubLookups = [];
  const offlineHub = async (url, init) => {
    if (String(url).startsWith("https://huggingface.co/api/models/")) {
      hubLookups.push(String(url));
      return new Response(JSON.stringify(HUB_MAPPING), { headers: { "content-type": "application/json" } });
    }
    return fetch(url, init);
  };
  // The provider polls with the global fetch; count the polls to show the wait between them ran.
  const realFetch = globalThis.fetch;
  let resultPolls = 0;
  globalThis.fetch = (url, init) => {
    if (String(url).endsWith("/result")) resultPolls += 1;
    return realFetch(url, init);
  };
  const client = new InferenceClient(apiKey, { fetch: offlineHub });
  const keepAlive = setInterval(() => {}, 1000);
  const blob = await client.imageToImage(
    {
      provider: "wavespeed",
      model: "Qwen/Qwen-Image-Edit",
      inputs: new Blob([fs.readFileSync(imagePath)], { type: "image/png" }),
      parameters: { prompt: "make it blue, slowly", size: "256*256", num_inference_steps: 12 },
      urlTransform: (url) => url.replace("https://api.wavespeed.ai", baseUrl),
    },
  ).finally(() => clearInterval(keepAlive));
  console.log(JSON.stringify({ type: blob.type, bytes: blob.size, hubLookups, resultPolls }));
}

main().catch((err) => {
  console.error(String(err && err.stack ? err.stack : err));
  process.exit(1);
});
