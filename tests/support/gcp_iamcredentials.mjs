// GCP's IAM Credentials API on 127.0.0.1, as much of it as service account impersonation uses:
// POST /v1/projects/-/serviceAccounts/EMAIL:generateAccessToken with the federated token as
// `Authorization: Bearer`. The bearer is verified as Google verifies it here: a JWT signed by
// the token issuer's keys (its JWKS, fetched from JWKS_URL), with that issuer and the workload
// identity provider as audience. The answer is Google's documented shape,
// {"accessToken", "expireTime"}; a bad bearer gets Google's error shape with 401, a service
// account other than ALLOWED_SA gets 403.
//
// Usage: node gcp_iamcredentials.mjs JWKS_URL ISSUER AUDIENCE ALLOWED_SA
// Prints "ready PORT", then per request "issued TOKEN SCOPES LIFETIME" or "refused WHY".
import http from 'node:http';
import { randomBytes } from 'node:crypto';
import { createRemoteJWKSet, jwtVerify } from 'jose';

const [jwksUrl, issuer, audience, allowed] = process.argv.slice(2);
const jwks = createRemoteJWKSet(new URL(jwksUrl));

const answer = (res, status, body) => {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
};
const refuse = (res, status, reason, message) => {
  console.log(`refused ${message}`);
  answer(res, status, { error: { code: status, message, status: reason } });
};

const server = http.createServer(async (req, res) => {
  const chunks = [];
  for await (const c of req) chunks.push(c);
  const m = req.method === 'POST'
    && req.url.match(/^\/v1\/projects\/-\/serviceAccounts\/([^/:]+):generateAccessToken$/);
  if (!m) {
    return refuse(res, 404, 'NOT_FOUND', `no such method ${req.method} ${req.url}`);
  }
  const bearer = (req.headers.authorization || '').match(/^Bearer (.+)$/);
  if (!bearer) {
    return refuse(res, 401, 'UNAUTHENTICATED', 'no bearer token');
  }
  try {
    await jwtVerify(bearer[1], jwks, { issuer, audience });
  } catch (e) {
    return refuse(res, 401, 'UNAUTHENTICATED', `bearer rejected: ${e.code || e.message}`);
  }
  const sa = decodeURIComponent(m[1]);
  if (sa !== allowed) {
    return refuse(res, 403, 'PERMISSION_DENIED', `caller may not impersonate ${sa}`);
  }
  let body;
  try {
    body = JSON.parse(Buffer.concat(chunks).toString());
  } catch {
    return refuse(res, 400, 'INVALID_ARGUMENT', 'body is not JSON');
  }
  if (!Array.isArray(body.scope) || body.scope.length === 0) {
    return refuse(res, 400, 'INVALID_ARGUMENT', 'scope is required');
  }
  const lifetime = Number((body.lifetime || '3600s').replace(/s$/, ''));
  const token = `ya29.${randomBytes(48).toString('base64url')}`;
  const expireTime = new Date(Date.now() + lifetime * 1000).toISOString();
  console.log(`issued ${token} ${body.scope.join(',')} ${lifetime}`);
  answer(res, 200, { accessToken: token, expireTime });
});
server.listen(0, '127.0.0.1', () => console.log(`ready ${server.address().port}`));
