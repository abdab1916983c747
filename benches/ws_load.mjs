// WebSocket load: a ws echo server, and a client that runs round trips over many connections
// and checks every echo. Used by benches/ws-load.sh (npm `ws` and `http-proxy-agent` from
// tests/support/node_modules, pinned there).
//
//   node ws_load.mjs serve                      prints `ready PORT`, echoes every message
//   node ws_load.mjs run URL CONNS SECONDS [PROXY]
//       CONNS connections (through PROXY with http-proxy-agent when given), each sending a
//       128-byte message and waiting for its echo, again and again for SECONDS. Prints one
//       JSON line: messages, errors (failed handshakes, closes, wrong echoes), messages/s and
//       round-trip p50/p99 in microseconds. Exits 1 when anything failed: a run with errors
//       is not a speed.
import { createRequire } from 'node:module';
const require = createRequire(new URL('../tests/support/package.json', import.meta.url));
const { WebSocket, WebSocketServer } = require('ws');
const { HttpProxyAgent } = require('http-proxy-agent');

const [mode, ...args] = process.argv.slice(2);

if (mode === 'serve') {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0, perMessageDeflate: false });
  wss.on('connection', (ws) => ws.on('message', (m, binary) => ws.send(m, { binary })));
  wss.on('listening', () => console.log(`ready ${wss.address().port}`));
} else {
  const [url, conns, seconds, proxy] = args;
  const agent = proxy ? new HttpProxyAgent(proxy) : undefined;
  const end = performance.now() + Number(seconds) * 1000;
  const payload = 'x'.repeat(120);
  const rtts = [];
  let errors = 0;
  const one = (i) =>
    new Promise((resolve) => {
      const ws = new WebSocket(url, { agent, perMessageDeflate: false, headers: { authorization: 'Bearer sk-proj-benchAppKey' } });
      let sent = 0;
      let body = '';
      const next = () => {
        if (performance.now() >= end) return ws.close(1000);
        body = `${i}:${sent++}:${payload}`;
        ws.t0 = performance.now();
        ws.send(body);
      };
      ws.on('open', next);
      ws.on('message', (m) => {
        rtts.push(performance.now() - ws.t0);
        if (m.toString() !== body) errors++;
        next();
      });
      // One error per failed connection, whether it errored, closed abnormally or both.
      let failed = false;
      const fail = () => { if (!failed) { failed = true; errors++; } resolve(); };
      ws.on('error', fail);
      ws.on('close', (code) => (code !== 1000 && code !== 1005 ? fail() : resolve()));
    });
  const start = performance.now();
  await Promise.all(Array.from({ length: Number(conns) }, (_, i) => one(i)));
  const took = (performance.now() - start) / 1000;
  rtts.sort((a, b) => a - b);
  const pct = (p) => Math.round((rtts[Math.floor((rtts.length - 1) * p)] ?? 0) * 1000);
  console.log(JSON.stringify({
    messages: rtts.length, errors, msgs_per_s: Math.round(rtts.length / took), p50_us: pct(0.5), p99_us: pct(0.99),
  }));
  process.exit(errors > 0 || rtts.length === 0 ? 1 : 0);
}
