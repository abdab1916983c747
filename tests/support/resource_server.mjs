// A resource server that verifies Chaperone's per-call tokens by each profile's own rules,
// with node `jose` (a mainstream JWT library, pinned in package.json), on 127.0.0.1.
//
// Usage: node resource_server.mjs JWKS_URL_FILE ISSUER AUDIENCE TRUST_DOMAIN
//   JWKS_URL_FILE holds the sidecar's JWKS URL, read at the first request (the sidecar starts
//   after this server, whose port its routes name).
//
// /at/...   RFC 9068 §4: the token comes as `Authorization: Bearer`; `typ` must be `at+jwt`;
//           `iss`, `aud` (AUDIENCE), `exp` checked; `iss exp aud sub client_id iat jti` required.
// /txn/...  OAuth Transaction Tokens: the token comes in the `Txn-Token` header, and an
//           `Authorization` header carrying a transaction token is refused (the draft forbids
//           using one as an access token); `typ` must be `txntoken+jwt`; `aud` must be the
//           trust domain; `iat aud exp txn sub scope` required.
// Both: a `jti` seen before is refused (per-call tokens are used once).
// Answers 200 {"profile", "claims"} or 401 {"error"}; prints "ready PORT", then per request
// "accepted PROFILE JTI" or "refused WHY".
import http from 'node:http';
import { readFileSync } from 'node:fs';
import { createRemoteJWKSet, jwtVerify, decodeProtectedHeader } from 'jose';

const [jwksFile, issuer, audience, trustDomain] = process.argv.slice(2);
let jwks;
const seen = new Set();

const verify = async (token, rules) => {
  jwks ??= createRemoteJWKSet(new URL(readFileSync(jwksFile, 'utf8').trim()));
  const { payload } = await jwtVerify(token, jwks, rules);
  if (seen.has(payload.jti)) {
    throw new Error(`replayed jti ${payload.jti}`);
  }
  seen.add(payload.jti);
  return payload;
};

const server = http.createServer(async (req, res) => {
  const answer = (status, body) => {
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  };
  const refuse = (why) => {
    console.log(`refused ${why}`);
    answer(401, { error: why });
  };
  try {
    if (req.url.startsWith('/at/')) {
      const m = (req.headers.authorization || '').match(/^Bearer (.+)$/);
      if (!m) return refuse('no bearer access token');
      const claims = await verify(m[1], {
        typ: 'at+jwt', issuer, audience,
        requiredClaims: ['iss', 'exp', 'aud', 'sub', 'client_id', 'iat', 'jti'],
      });
      console.log(`accepted access_token ${claims.jti}`);
      return answer(200, { profile: 'access_token', claims });
    }
    if (req.url.startsWith('/txn/')) {
      const auth = (req.headers.authorization || '').replace(/^Bearer /, '');
      if (auth && decodeProtectedHeader(auth).typ === 'txntoken+jwt') {
        return refuse('a transaction token used as an access token');
      }
      const token = req.headers['txn-token'];
      if (!token) return refuse('no Txn-Token header');
      const claims = await verify(token, {
        typ: 'txntoken+jwt', audience: trustDomain,
        requiredClaims: ['iat', 'aud', 'exp', 'txn', 'sub', 'scope'],
      });
      console.log(`accepted txn_token ${claims.jti}`);
      return answer(200, { profile: 'txn_token', claims, authorization: req.headers.authorization ?? null });
    }
    return answer(404, { error: 'no such resource' });
  } catch (e) {
    return refuse(`${e.code || 'error'}: ${e.message}`);
  }
});
server.listen(0, '127.0.0.1', () => console.log(`ready ${server.address().port}`));
