//! The loopback artifact mirror `versions add` fetches from in the end-to-end suite: GET of
//! files under one directory (symlinks followed: the mirror is a symlink farm over the fixtures).

use anyhow::Context;
use std::path::{Component, Path, PathBuf};

/// The file a request path names under `root`, refusing anything that climbs out of it.
pub fn resolve(root: &Path, url: &str) -> Option<PathBuf> {
    let path = url.split(['?', '#']).next()?.trim_start_matches('/');
    let rel = Path::new(path);
    rel.components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then(|| root.join(rel))
}

/// Serve `root` on 127.0.0.1 at a free port until killed; the port is written to `port_file`
/// once the socket listens.
pub fn serve(root: &Path, port_file: &Path) -> anyhow::Result<()> {
    let server = tiny_http::Server::http("127.0.0.1:0")
        .map_err(|e| anyhow::anyhow!("cannot listen on 127.0.0.1: {e}"))?;
    let port = server
        .server_addr()
        .to_ip()
        .context("not an IP socket")?
        .port();
    std::fs::write(port_file, format!("{port}\n"))
        .with_context(|| format!("writing {}", port_file.display()))?;
    for request in server.incoming_requests() {
        let file = resolve(root, request.url()).and_then(|p| std::fs::File::open(p).ok());
        let answered = match file.filter(|_| *request.method() == tiny_http::Method::Get) {
            Some(f) => request.respond(tiny_http::Response::from_file(f)),
            None => request.respond(tiny_http::Response::empty(404)),
        };
        if let Err(e) = answered {
            eprintln!("e2e-check serve: {e}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_under_the_root() {
        let root = Path::new("/m");
        assert_eq!(
            resolve(root, "/a/b.tar.gz?x=1"),
            Some(PathBuf::from("/m/a/b.tar.gz"))
        );
        assert_eq!(resolve(root, "/../etc/passwd"), None);
        assert_eq!(resolve(root, "/a/../../x"), None);
    }
}
