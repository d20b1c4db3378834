//! Idle keep-alive connections held open beside the load (`--idle-connections`): each
//! sends one `GET /health`, reads the answer and then stays open and silent, as the
//! parked connections of many clients do. What a server spends on them shows as the
//! difference in the measured levels.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens `n` connections to the server at `url` (`http://host:port`), each after one
/// answered request. Fails if any cannot be opened.
pub async fn open(url: &str, n: usize) -> Result<Vec<TcpStream>, String> {
    let authority = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = TcpStream::connect(&authority)
            .await
            .map_err(|e| format!("idle connection {i} to {authority}: {e}"))?;
        let request = format!("GET /health HTTP/1.1\r\nHost: {authority}\r\n\r\n");
        s.write_all(request.as_bytes())
            .await
            .map_err(|e| format!("idle connection {i}: {e}"))?;
        read_one_response(&mut s)
            .await
            .map_err(|e| format!("idle connection {i}: {e}"))?;
        held.push(s);
    }
    Ok(held)
}

/// Reads one response with a `content-length` body.
async fn read_one_response(s: &mut TcpStream) -> Result<(), String> {
    let mut buf = Vec::new();
    let mut piece = [0u8; 4096];
    let read = async {
        loop {
            let n = s.read(&mut piece).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before the answer".to_string());
            }
            buf.extend_from_slice(&piece[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length {
                    return Ok(());
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .map_err(|_| "no answer within 30 s".to_string())?
}
