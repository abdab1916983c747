// The official MCP TypeScript SDK's client (`@modelcontextprotocol/client`, streamable HTTP,
// pinned in package.json) as a Node agent uses it, through the proxy its environment names
// (undici's EnvHttpProxyAgent reads HTTP_PROXY and NO_PROXY), for tests/mcp.rs.
//
// Usage: node mcp_client_ts.mjs URL [CALLS]
// Prints the same `NAME JSON` lines as mcp_client.py: the tools listed, then each call's
// outcome (`NAME#N` for a tool's second and later calls).
import { Client, StreamableHTTPClientTransport } from '@modelcontextprotocol/client';
import { EnvHttpProxyAgent, fetch, setGlobalDispatcher } from 'undici';

setGlobalDispatcher(new EnvHttpProxyAgent());

const [url, callsJson] = process.argv.slice(2);
const calls = callsJson
  ? JSON.parse(callsJson)
  : [
      ['search_docs', { query: 'sidecar', repo: 'public' }],
      ['delete_repository', { name: 'prod' }],
    ];
const print = (name, value) => console.log(`${name} ${JSON.stringify(value)}`);

const client = new Client({ name: 'chaperone-test', version: '1.0.0' });
await client.connect(new StreamableHTTPClientTransport(new URL(url), { fetch }));
const listed = await client.listTools();
print('tools', listed.tools.map((t) => t.name).sort());
const seen = {};
for (const [name, args] of calls) {
  seen[name] = (seen[name] ?? 0) + 1;
  const label = seen[name] === 1 ? name : `${name}#${seen[name]}`;
  try {
    const r = await client.callTool({ name, arguments: args });
    print(label, { error: Boolean(r.isError), text: r.content?.[0]?.text ?? '' });
  } catch (e) {
    print(label, { raised: e.constructor.name, message: e.message });
  }
}
await client.close();
