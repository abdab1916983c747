// A real OAuth2 authorization server for the tests: npm oidc-provider on 127.0.0.1.
// Usage: node oidc-provider.mjs PORT CLIENT_SECRET   (PORT 0: any free port)
// Prints "ready PORT" when listening; one "token" line per token request.
//
// Environment (all optional):
//   TOKEN_TTL          access-token lifetime in seconds (default 120)
//   CLIENT_JWK         path of a public JWK (JSON): enables client `chaperone-jwt`
//                      (private_key_jwt, RFC 7523)
//   SUBJECT_JWKS       path of a JWKS (JSON) that signs subject and actor tokens: enables
//                      RFC 8693 token exchange, registered with provider.registerGrantType,
//                      the public client `chaperone-public` that may only exchange, and
//                      GET /subject-jwks serving that JWKS, and the RFC 7523 jwt-bearer grant
//                      (assertions from that issuer, or tokens this server issued)
//   OPAQUE_TOKENS=1    opaque access tokens (revocable, introspectable) instead of JWTs
//   DPOP_NONCE=1       the token endpoint demands DPoP nonces (use_dpop_nonce, RFC 9449 §8)
//   RESOURCE_AUDIENCE=1  tokens are for the RFC 8707 resource asked for (`aud`), not always
//                      https://tools.test
//   EXCHANGE_GRANTS_ALL=1  the exchange grants every scope of the client whatever was asked
//                      (a misconfigured server, for the scope checks)
//   TLS_CERT, TLS_KEY, TLS_CA  serve HTTPS and ask for client certificates signed by TLS_CA:
//                      enables client `chaperone-mtls` (tls_client_auth, RFC 8705) whose
//                      certificate must carry the DNS name `chaperone.client.test`
import { readFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import http from 'node:http';
import https from 'node:https';
import Provider, { errors } from 'oidc-provider';
import { generateKeyPair, exportJWK, jwtVerify, createLocalJWKSet } from 'jose';

const [port, secret] = process.argv.slice(2);
const env = process.env;
const tls = env.TLS_CERT ? {
  cert: readFileSync(env.TLS_CERT), key: readFileSync(env.TLS_KEY), ca: readFileSync(env.TLS_CA),
} : null;
// Listen first, so that the issuer names the port actually bound (PORT 0 included).
const server = tls
  ? https.createServer({ ...tls, requestCert: true, rejectUnauthorized: false })
  : http.createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(Number(port), '127.0.0.1', resolve);
});
const bound = server.address().port;
const issuer = `${tls ? 'https' : 'http'}://127.0.0.1:${bound}`;
const RESOURCE = 'https://tools.test';
const TTL = Number(env.TOKEN_TTL || 120);
const SCOPES = 'tools.read tools.write';
const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const JWT_TYPE = 'urn:ietf:params:oauth:token-type:jwt';
const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';
const SUBJECT_ISSUER = 'https://kubernetes.default.svc';
const { privateKey } = await generateKeyPair('ES256', { extractable: true });
const signing = { ...(await exportJWK(privateKey)), alg: 'ES256', use: 'sig', kid: 'test-es256' };
const JWT_BEARER = 'urn:ietf:params:oauth:grant-type:jwt-bearer';
const grantTypes = ['client_credentials', ...(env.SUBJECT_JWKS ? [TOKEN_EXCHANGE, JWT_BEARER] : [])];

const client = (id, extra) => ({
  client_id: id,
  grant_types: grantTypes,
  redirect_uris: [],
  response_types: [],
  id_token_signed_response_alg: 'ES256',
  scope: SCOPES,
  ...extra,
});
const clients = [
  client('chaperone', { client_secret: secret, token_endpoint_auth_method: 'client_secret_basic' }),
  client('chaperone-post', { client_secret: secret, token_endpoint_auth_method: 'client_secret_post' }),
];
if (env.CLIENT_JWK) {
  const jwk = JSON.parse(readFileSync(env.CLIENT_JWK, 'utf8'));
  clients.push(client('chaperone-jwt', {
    token_endpoint_auth_method: 'private_key_jwt',
    token_endpoint_auth_signing_alg: jwk.alg,
    jwks: { keys: [jwk] },
  }));
}
if (env.SUBJECT_JWKS) {
  // A public client that only exchanges tokens (the subject token is the proof), as GCP's
  // STS is used for workload identity federation.
  clients.push(client('chaperone-public', {
    token_endpoint_auth_method: 'none',
    grant_types: [TOKEN_EXCHANGE],
  }));
}
if (tls) {
  clients.push(client('chaperone-mtls', {
    token_endpoint_auth_method: 'tls_client_auth',
    tls_client_auth_san_dns: 'chaperone.client.test',
  }));
}

const resourceServer = (audience) => ({
  scope: SCOPES,
  audience,
  accessTokenFormat: env.OPAQUE_TOKENS ? 'opaque' : 'jwt',
  accessTokenTTL: TTL,
  jwt: { sign: { alg: 'ES256' } },
});

const provider = new Provider(issuer, {
  clients,
  scopes: SCOPES.split(' '),
  clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt', 'none',
    ...(tls ? ['tls_client_auth'] : [])],
  features: {
    devInteractions: { enabled: false },
    // DPoP (RFC 9449) is on by default; DPOP_NONCE=1 makes the token endpoint demand
    // server-provided nonces (400 use_dpop_nonce with a DPoP-Nonce header).
    dPoP: {
      enabled: true,
      ...(env.DPOP_NONCE ? { nonceSecret: randomBytes(32), requireNonce: () => true } : {}),
    },
    clientCredentials: { enabled: true },
    // RFC 7009 revocation at /token/revocation, RFC 7662 introspection at
    // /token/introspection (a test asks whether a token is still active).
    revocation: { enabled: true },
    introspection: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => RESOURCE,
      useGrantedResource: () => true,
      // With RESOURCE_AUDIENCE=1 a token is for the resource asked for (its `aud`), as an
      // MCP server's authorization server issues them; else always for RESOURCE.
      getResourceServerInfo: (_ctx, indicator) =>
        resourceServer(env.RESOURCE_AUDIENCE ? indicator : RESOURCE),
    },
    mTLS: {
      enabled: !!tls,
      tlsClientAuth: !!tls,
      getCertificate: (ctx) => ctx.socket.getPeerX509Certificate?.()?.toString(),
      certificateAuthorized: (ctx) => ctx.socket.authorized,
      certificateSubjectMatches: (ctx, property, expected) => property === 'tls_client_auth_san_dns'
        && (ctx.socket.getPeerX509Certificate()?.subjectAltName ?? '').split(', ').includes(`DNS:${expected}`),
    },
  },
  formats: {
    customizers: {
      // Exchanged tokens speak for the subject, not the client (RFC 8693 §4.1 `act`).
      jwt(_ctx, token, jwt) {
        if (token.extra?.exchanged_sub) {
          jwt.payload.sub = token.extra.exchanged_sub;
          delete jwt.payload.exchanged_sub;
        }
      },
    },
  },
  extraTokenClaims: (ctx) => ctx?.exchangeClaims,
  jwks: { keys: [signing] },
  ttl: { ClientCredentials: () => TTL },
});
provider.proxy = false;

if (env.SUBJECT_JWKS) {
  const trusted = createLocalJWKSet(JSON.parse(readFileSync(env.SUBJECT_JWKS, 'utf8')));
  const verify = async (token, type, what) => {
    if (type !== JWT_TYPE) {
      throw new errors.InvalidRequest(`unsupported ${what}_token_type`);
    }
    try {
      const { payload } = await jwtVerify(token, trusted, { issuer: SUBJECT_ISSUER, audience: 'sts.test' });
      return payload;
    } catch (e) {
      throw new errors.InvalidGrant(`${what}_token rejected: ${e.code || e.message}`);
    }
  };
  // oidc-provider's documented extension point for new grants (v9: handlers get ctx only).
  provider.registerGrantType(TOKEN_EXCHANGE, async (ctx) => {
    const { params, client: c } = ctx.oidc;
    if (!params.subject_token) {
      throw new errors.InvalidRequest('missing subject_token');
    }
    const subject = await verify(params.subject_token, params.subject_token_type, 'subject');
    const actor = params.actor_token
      ? await verify(params.actor_token, params.actor_token_type, 'actor') : null;
    if (params.requested_token_type && params.requested_token_type !== ACCESS_TOKEN_TYPE) {
      throw new errors.InvalidRequest('only access tokens can be requested');
    }
    const allowed = c.scope.split(' ');
    const asked = (params.scope || '').split(' ').filter(Boolean);
    const unknown = asked.filter((s) => !allowed.includes(s) && !s.startsWith('purpose:'));
    if (unknown.length) {
      throw new errors.InvalidScope('requested scope is not allowed', unknown.join(' '));
    }
    const scope = env.EXCHANGE_GRANTS_ALL ? SCOPES : asked.join(' ');
    const audience = params.audience || params.resource || RESOURCE;
    const token = new ctx.oidc.provider.ClientCredentials({ client: c, scope: scope || undefined });
    token.resourceServer = new ctx.oidc.provider.ResourceServer(audience, resourceServer(audience));
    // Read back by extraTokenClaims when the token is saved.
    ctx.exchangeClaims = {
      exchanged_sub: subject.sub,
      ...(actor ? { act: { sub: actor.sub } } : {}),
    };
    const value = await token.save();
    console.log(`exchange ${subject.jti}`);
    ctx.body = {
      access_token: value,
      issued_token_type: ACCESS_TOKEN_TYPE,
      token_type: 'Bearer',
      expires_in: token.expiration,
      scope: token.scope,
    };
  }, ['subject_token', 'subject_token_type', 'actor_token', 'actor_token_type',
    'requested_token_type', 'audience', 'resource', 'scope']);

  // RFC 7523 §2.1: an assertion signed by the subject issuer, or a token this server issued
  // itself (a chained grant: an exchanged token traded on, as ID-JAG is), for an access token
  // whose `sub` is the assertion's.
  const own = createLocalJWKSet({ keys: [(({ d, ...pub }) => pub)(signing)] });
  provider.registerGrantType(JWT_BEARER, async (ctx) => {
    const { params, client: c } = ctx.oidc;
    if (!params.assertion) {
      throw new errors.InvalidRequest('missing assertion');
    }
    let subject;
    try {
      ({ payload: subject } = await jwtVerify(params.assertion, trusted, { issuer: SUBJECT_ISSUER, audience: 'sts.test' }));
    } catch {
      try {
        ({ payload: subject } = await jwtVerify(params.assertion, own, { issuer }));
      } catch (e) {
        throw new errors.InvalidGrant(`assertion rejected: ${e.code || e.message}`);
      }
    }
    const asked = (params.scope || '').split(' ').filter(Boolean);
    const token = new ctx.oidc.provider.ClientCredentials({ client: c, scope: asked.join(' ') || undefined });
    const audience = params.resource || RESOURCE;
    token.resourceServer = new ctx.oidc.provider.ResourceServer(audience, resourceServer(audience));
    ctx.exchangeClaims = { exchanged_sub: subject.sub };
    const value = await token.save();
    console.log(`jwt-bearer ${subject.iss === issuer ? 'chained' : 'external'} ${subject.sub}`);
    ctx.body = { access_token: value, token_type: 'Bearer', expires_in: token.expiration, scope: token.scope };
  }, ['assertion', 'scope', 'resource']);
}

provider.on('server_error', (_ctx, err) => console.error('server_error', err));
provider.on('grant.error', (_ctx, err) => console.error('grant.error', err.message, err.error_description ?? ''));
provider.use(async (ctx, next) => {
  if (ctx.path === '/token') {
    console.log('token');
  }
  if (ctx.path === '/token/revocation') {
    console.log('revocation');
  }
  // The subject tokens' issuer publishes its keys here (as an IdP does), for a sidecar that
  // verifies a user's token before exchanging it.
  if (ctx.path === '/subject-jwks' && env.SUBJECT_JWKS) {
    console.log('subject-jwks');
    ctx.type = 'application/json';
    ctx.body = readFileSync(env.SUBJECT_JWKS, 'utf8');
    return;
  }
  await next();
});
server.on('request', provider.callback());
console.log(`ready ${bound}`);
