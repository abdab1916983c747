// axios through Chaperone (tests/sdks.rs), the three ways Node apps configure it:
//  - `proxy` option for http:// (absolute form);
//  - HTTPS_PROXY from the environment for https:// (axios then sends the https URL to the
//    proxy in absolute form over plain HTTP, and the proxy makes the TLS connection);
//  - `httpsAgent: new HttpsProxyAgent(proxy)` with `proxy: false` for https:// (CONNECT,
//    intercepted; the CA from NODE_EXTRA_CA_CERTS).
// Usage: node axios_client.mjs PROXY TLS_BASE PLAIN_BASE APP_KEY
// Prints `NAME JSON` per call, as sdk_clients.py does.
import axios from 'axios';
import { HttpsProxyAgent } from 'https-proxy-agent';

const [proxy, tlsBase, plainBase, key] = process.argv.slice(2);
const p = new URL(proxy);
const headers = { authorization: `Bearer ${key}` };

async function calls(name, base, options) {
  const r = await axios.get(`${base}/echo`, { ...options, headers: { ...headers, 'chaperone-purpose': 'call' } });
  if (r.status !== 200) throw new Error(`${name}: ${r.status}`);
  console.log(name, JSON.stringify({ seen: r.data }));
  const s = await axios.get(`${base}/sse`, {
    ...options,
    headers: { ...headers, 'chaperone-purpose': 'stream' },
    responseType: 'stream',
  });
  const times = [];
  let first = null;
  let pending = '';
  for await (const chunk of s.data) {
    pending += chunk.toString();
    let i;
    while ((i = pending.indexOf('\n\n')) >= 0) {
      const event = pending.slice(0, i);
      pending = pending.slice(i + 2);
      if (event.startsWith('data: ')) {
        first ??= JSON.parse(event.slice(6));
        times.push(performance.now());
      }
    }
  }
  console.log(`${name}-sse`, JSON.stringify({ seen: first, parts: times.length, spread_ms: times.at(-1) - times[0] }));
}

await calls('axios-http', plainBase, { proxy: { protocol: 'http', host: p.hostname, port: Number(p.port) } });
await calls('axios-https-env', tlsBase, {});
await calls('axios-https-agent', tlsBase, { httpsAgent: new HttpsProxyAgent(proxy), proxy: false });
