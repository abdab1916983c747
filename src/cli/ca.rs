//! `chaperone ca init`: the local CA that signs intercepted HTTPS connections.

use std::path::Path;

use super::Exit;

/// Create the CA in `out`: 0 done, 2 on error (an existing CA without `--force`, I/O).
pub(crate) fn init(out: &Path, days: u32, force: bool) -> Exit {
    match crate::tls::init_ca(out, days, force) {
        Ok((cert, key)) => {
            println!("CA certificate: {} (valid {days} days)", cert.display());
            println!(
                "CA key:         {} (mode 0600; keep it secret)",
                key.display()
            );
            println!(
                "Use it:  tls: {{ ca_cert: {}, ca_key: {} }}",
                cert.display(),
                key.display()
            );
            println!("Trust it in the app: see README.md, \"Trusting the local CA\".");
            Exit::Ok
        }
        Err(e) => {
            eprintln!("chaperone ca init: {e}");
            Exit::Error
        }
    }
}
