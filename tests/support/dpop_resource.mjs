// A resource server that takes DPoP-bound access tokens (RFC 9449 §7), verified with node
// `jose`: `Authorization: DPoP <token>` (a bearer is refused); the token checked against the
// authorization server's JWKS, issuer and audience; the `DPoP` proof checked by its own
// embedded key (`typ: dpop+jwt`, `iat` within 60 s), bound to this request (`htm`, `htu`),
// to this token (`ath`, and the token's `cnf.jkt` is the proof key's thumbprint), used once
// (`jti`), and, with REQUIRE_NONCE, carrying the nonce this server handed out (else 401
// `use_dpop_nonce` with a `DPoP-Nonce` header, §9).
//
// Usage: node dpop_resource.mjs AS_ISSUER AUDIENCE [REQUIRE_NONCE]
// Prints "ready PORT", then per request "accepted JKT JTI" or "refused WHY".
import http from 'node:http';
import { createHash } from 'node:crypto';
import {
  createRemoteJWKSet, jwtVerify, decodeProtectedHeader, importJWK, calculateJwkThumbprint,
} from 'jose';

const [issuer, audience, requireNonce] = process.argv.slice(2);
const jwks = createRemoteJWKSet(new URL(`${issuer}/jwks`));
const NONCE = 'rs-nonce-1';
const seen = new Set();

const server = http.createServer(async (req, res) => {
  const refuse = (why, nonce) => {
    console.log(`refused ${why}`);
    const headers = { 'content-type': 'application/json' };
    if (nonce) {
      headers['www-authenticate'] = 'DPoP error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof"';
      headers['dpop-nonce'] = NONCE;
    } else {
      headers['www-authenticate'] = `DPoP error="invalid_token", error_description="${why}"`;
    }
    res.writeHead(401, headers);
    res.end(JSON.stringify({ error: why }));
  };
  try {
    const m = (req.headers.authorization || '').match(/^DPoP (.+)$/);
    if (!m) return refuse('no DPoP-bound token');
    const token = m[1];
    const proof = req.headers.dpop;
    if (!proof || proof.includes(',')) return refuse('no single DPoP proof');
    const header = decodeProtectedHeader(proof);
    if (header.typ !== 'dpop+jwt' || !header.jwk) return refuse('not a DPoP proof');
    const key = await importJWK(header.jwk, header.alg);
    const { payload: p } = await jwtVerify(proof, key, { typ: 'dpop+jwt', maxTokenAge: '60s' });
    const path = req.url.split('?')[0];
    const htu = `http://${req.headers.host}${path}`;
    if (p.htm !== req.method) return refuse(`htm ${p.htm} is not ${req.method}`);
    if (p.htu !== htu) return refuse(`htu ${p.htu} is not ${htu}`);
    const ath = createHash('sha256').update(token).digest('base64url');
    if (p.ath !== ath) return refuse('ath does not match the token');
    if (seen.has(p.jti)) return refuse(`replayed proof ${p.jti}`);
    seen.add(p.jti);
    if (requireNonce && p.nonce !== NONCE) return refuse('no nonce', true);
    const { payload: at } = await jwtVerify(token, jwks, { issuer, audience });
    const jkt = await calculateJwkThumbprint(header.jwk, 'sha256');
    if (at.cnf?.jkt !== jkt) return refuse('the token is not bound to the proof key');
    console.log(`accepted ${jkt} ${p.jti}`);
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ sub: at.sub, client_id: at.client_id, jkt, scope: at.scope }));
  } catch (e) {
    refuse(`${e.code || 'error'}: ${e.message}`);
  }
});
server.listen(0, '127.0.0.1', () => console.log(`ready ${server.address().port}`));
