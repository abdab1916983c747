// A real OAuth2 authorization server for the tests: npm oidc-provider on 127.0.0.1.
// Usage: node oidc-provider.mjs PORT CLIENT_SECRET
// Prints "ready" when listening; one "token <grant_type>" line per token request.
import Provider from 'oidc-provider';
import { generateKeyPair, exportJWK } from 'jose';

const [port, secret] = process.argv.slice(2);
const issuer = `http://127.0.0.1:${port}`;
const RESOURCE = 'https://tools.test';
const TTL = Number(process.env.TOKEN_TTL || 120);
const { privateKey } = await generateKeyPair('ES256', { extractable: true });
const signing = { ...(await exportJWK(privateKey)), alg: 'ES256', use: 'sig', kid: 'test-es256' };

const provider = new Provider(issuer, {
  clients: [{
    client_id: 'chaperone',
    client_secret: secret,
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    token_endpoint_auth_method: 'client_secret_basic',
    id_token_signed_response_alg: 'ES256',
    scope: 'tools.read tools.write',
  }, {
    client_id: 'chaperone-post',
    client_secret: secret,
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    token_endpoint_auth_method: 'client_secret_post',
    id_token_signed_response_alg: 'ES256',
    scope: 'tools.read tools.write',
  }],
  scopes: ['tools.read', 'tools.write'],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => RESOURCE,
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: 'tools.read tools.write',
        audience: RESOURCE,
        accessTokenFormat: 'jwt',
        accessTokenTTL: TTL,
        jwt: { sign: { alg: 'ES256' } },
      }),
    },
  },
  jwks: { keys: [signing] },
  ttl: { ClientCredentials: () => TTL },
});
provider.proxy = false;
provider.on('server_error', (_ctx, err) => console.error('server_error', err));
provider.use(async (ctx, next) => {
  if (ctx.path === '/token') {
    console.log('token');
  }
  await next();
});
provider.listen(Number(port), '127.0.0.1', () => console.log('ready'));
