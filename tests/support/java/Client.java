// Java's java.net.http.HttpClient through Chaperone (tests/sdks.rs), configured as a Java app
// would: a ProxySelector for the proxy, an SSLContext trusting Chaperone's CA. HTTPS goes
// through CONNECT (intercepted; HTTP/2 by ALPN); http:// in absolute form (HttpClient also
// offers an h2c upgrade there, which the proxy must not pass on).
// Usage: java Client.java PROXY_HOST PROXY_PORT CA_PEM TLS_BASE PLAIN_BASE APP_KEY
// Prints `NAME JSON` per call, as sdk_clients.py does.
import java.io.FileInputStream;
import java.net.InetSocketAddress;
import java.net.ProxySelector;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.security.KeyStore;
import java.security.cert.CertificateFactory;
import java.util.ArrayList;
import java.util.List;
import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManagerFactory;

public class Client {
    public static void main(String[] a) throws Exception {
        KeyStore trust = KeyStore.getInstance(KeyStore.getDefaultType());
        trust.load(null);
        try (FileInputStream ca = new FileInputStream(a[2])) {
            trust.setCertificateEntry("chaperone", CertificateFactory.getInstance("X.509").generateCertificate(ca));
        }
        TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(trust);
        SSLContext ssl = SSLContext.getInstance("TLS");
        ssl.init(null, tmf.getTrustManagers(), null);
        HttpClient client = HttpClient.newBuilder()
            .proxy(ProxySelector.of(new InetSocketAddress(a[0], Integer.parseInt(a[1]))))
            .sslContext(ssl)
            .build();
        String[][] bases = {{"java-https", a[3]}, {"java-http", a[4]}};
        for (String[] b : bases) {
            HttpResponse<String> r = client.send(
                request(b[1] + "/echo", a[5], "call"), HttpResponse.BodyHandlers.ofString());
            if (r.statusCode() != 200) throw new IllegalStateException(b[0] + ": " + r.statusCode());
            System.out.println(b[0] + " {\"seen\": " + r.body() + ", \"client_version\": \"" + r.version() + "\"}");
            HttpResponse<java.util.stream.Stream<String>> s = client.send(
                request(b[1] + "/sse", a[5], "stream"), HttpResponse.BodyHandlers.ofLines());
            List<Long> times = new ArrayList<>();
            String first = null;
            for (String line : (Iterable<String>) s.body()::iterator) {
                if (line.startsWith("data: ")) {
                    if (first == null) first = line.substring(6);
                    times.add(System.nanoTime());
                }
            }
            double spread = (times.get(times.size() - 1) - times.get(0)) / 1e6;
            System.out.println(b[0] + "-sse {\"seen\": " + first + ", \"parts\": " + times.size() + ", \"spread_ms\": " + spread + "}");
        }
    }

    static HttpRequest request(String url, String key, String purpose) {
        return HttpRequest.newBuilder(URI.create(url))
            .header("Authorization", "Bearer " + key)
            .header("chaperone-purpose", purpose)
            .build();
    }
}
