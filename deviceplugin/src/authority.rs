//! Serving every gRPC client: the kubelet names the plugin `localhost` in `:authority`, but
//! gRPC's C-core (Python, C++, Ruby), Java and Swift clients, and kubelets before
//! `grpc.WithAuthority("localhost")`, send the socket path, raw or percent-encoded. The HTTP/2
//! layer under tonic (`h2`) answers such a request with `RST_STREAM(PROTOCOL_ERROR)` before any
//! of our code runs, and has no setting to relax it.
//!
//! So each connection passes through a relay: frames from the client are copied to the server
//! unchanged, except header blocks, which are decoded (HPACK, with the client's table) and
//! encoded again with an `:authority` of `localhost` wherever the client's is not a valid
//! authority. The blocks the server sees are all ours, so its HPACK table follows our encoder,
//! which never indexes. Frames to the client are copied unchanged.

use std::io;

use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What every HTTP/2 connection begins with.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 peer must accept (`SETTINGS_MAX_FRAME_SIZE`'s floor).
const MAX_FRAME: usize = 16_384;
/// A header block larger than this is refused (the server's own limit is far below).
const MAX_BLOCK: usize = 1 << 20;
/// What a client that names no valid authority is taken to mean.
const LOCALHOST: &[u8] = b"localhost";

/// Relay one connection: `client`'s bytes to `server` with authorities mended, `server`'s back
/// unchanged. Ends when the server side ends, or the client's side has been relayed and the
/// server has answered.
pub(crate) async fn relay<C, S>(client: C, server: S)
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (client_r, mut client_w) = tokio::io::split(client);
    let (mut server_r, server_w) = tokio::io::split(server);
    let up = mend_requests(client_r, server_w);
    let down = async {
        let _ = tokio::io::copy(&mut server_r, &mut client_w).await;
        let _ = client_w.shutdown().await;
    };
    tokio::pin!(up, down);
    tokio::select! {
        r = &mut up => {
            if let Err(e) = r {
                tracing::debug!("gRPC connection closed: {e}");
                return;
            }
            down.await;
        }
        () = &mut down => {}
    }
}

struct Frame {
    kind: u8,
    flags: u8,
    /// The stream identifier's four bytes, reserved bit included, as they came.
    stream: [u8; 4],
    payload: Vec<u8>,
}

impl Frame {
    fn header(&self) -> [u8; 9] {
        frame_header(self.payload.len(), self.kind, self.flags, self.stream)
    }
}

fn frame_header(len: usize, kind: u8, flags: u8, stream: [u8; 4]) -> [u8; 9] {
    let len = u32::try_from(len)
        .expect("frame length fits 24 bits")
        .to_be_bytes();
    [
        len[1], len[2], len[3], kind, flags, stream[0], stream[1], stream[2], stream[3],
    ]
}

fn protocol(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// The next frame, or `None` at a clean end of the stream.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut head = [0u8; 9];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: [head[5], head[6], head[7], head[8]],
        payload,
    }))
}

/// A HEADERS frame's priority fields (empty without the flag) and its header block fragment,
/// padding removed.
fn headers_fragment(frame: &Frame) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let mut body = frame.payload.as_slice();
    let mut pad = 0;
    if frame.flags & PADDED != 0 {
        let (&p, rest) = body
            .split_first()
            .ok_or_else(|| protocol("HEADERS frame too short for its padding"))?;
        pad = usize::from(p);
        body = rest;
    }
    let mut priority = Vec::new();
    if frame.flags & PRIORITY != 0 {
        if body.len() < 5 {
            return Err(protocol("HEADERS frame too short for its priority"));
        }
        priority = body[..5].to_vec();
        body = &body[5..];
    }
    if pad > body.len() {
        return Err(protocol("HEADERS frame padding exceeds its payload"));
    }
    Ok((priority, body[..body.len() - pad].to_vec()))
}

/// Whether `h2` accepts `value` as an `:authority`.
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// A header block's fields, with an invalid `:authority` replaced by `localhost`.
fn mend(decoder: &mut Decoder<'_>, block: &[u8]) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut fields = Vec::new();
    decoder
        .decode_with_cb(block, |name, value| {
            let value = if &*name == b":authority" && !valid_authority(&value) {
                LOCALHOST.to_vec()
            } else {
                value.into_owned()
            };
            fields.push((name.into_owned(), value));
        })
        .map_err(|e| protocol(&format!("undecodable header block: {e:?}")))?;
    Ok(fields)
}

/// Copy frames from `r` to `w`, each header block decoded and encoded again with its
/// authority mended.
async fn mend_requests<R, W>(mut r: R, mut w: W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    r.read_exact(&mut preface).await?;
    w.write_all(&preface).await?;
    if &preface != PREFACE {
        // Not HTTP/2: the server refuses it in its own words.
        tokio::io::copy(&mut r, &mut w).await?;
        return w.shutdown().await;
    }
    let mut decoder = Decoder::new();
    let mut encoder = Encoder::new();
    // Never index: the server's table then never depends on ours.
    encoder.set_max_table_size(0);
    while let Some(frame) = read_frame(&mut r).await? {
        if frame.kind != HEADERS {
            w.write_all(&frame.header()).await?;
            w.write_all(&frame.payload).await?;
            continue;
        }
        let (priority, mut block) = headers_fragment(&frame)?;
        let mut ended = frame.flags & END_HEADERS != 0;
        while !ended {
            let next = read_frame(&mut r)
                .await?
                .ok_or_else(|| protocol("connection ended inside a header block"))?;
            if next.kind != CONTINUATION || next.stream != frame.stream {
                return Err(protocol("a header block was interrupted"));
            }
            block.extend_from_slice(&next.payload);
            if block.len() > MAX_BLOCK {
                return Err(protocol("header block too large"));
            }
            ended = next.flags & END_HEADERS != 0;
        }
        let fields = mend(&mut decoder, &block)?;
        let block = encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let flags = (frame.flags & (END_STREAM | PRIORITY)) & !PADDED;
        write_headers(&mut w, frame.stream, flags, &priority, &block).await?;
    }
    w.shutdown().await
}

/// One header block as a HEADERS frame and as many CONTINUATION frames as it needs.
async fn write_headers<W: AsyncWrite + Unpin>(
    w: &mut W,
    stream: [u8; 4],
    flags: u8,
    priority: &[u8],
    block: &[u8],
) -> io::Result<()> {
    let first = block.len().min(MAX_FRAME - priority.len());
    let (head, mut rest) = block.split_at(first);
    let end = if rest.is_empty() { END_HEADERS } else { 0 };
    w.write_all(&frame_header(
        priority.len() + head.len(),
        HEADERS,
        flags | end,
        stream,
    ))
    .await?;
    w.write_all(priority).await?;
    w.write_all(head).await?;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
        let end = if tail.is_empty() { END_HEADERS } else { 0 };
        w.write_all(&frame_header(chunk.len(), CONTINUATION, end, stream))
            .await?;
        w.write_all(chunk).await?;
        rest = tail;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(authority: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (
                b":path".to_vec(),
                b"/v1beta1.DevicePlugin/Allocate".to_vec(),
            ),
            (b":authority".to_vec(), authority.to_vec()),
            (b"x-long".to_vec(), vec![b'a'; 40_000]),
        ]
    }

    /// A client's bytes: the preface, then a HEADERS block split over CONTINUATION frames,
    /// padded and with priority, then a DATA frame.
    fn client_bytes(authority: &[u8]) -> Vec<u8> {
        let mut enc = Encoder::new();
        let f = fields(authority);
        let block = enc.encode(f.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let stream = [0, 0, 0, 1];
        let mut out = PREFACE.to_vec();
        let (a, b) = block.split_at(100);
        let mut first = vec![3u8];
        first.extend_from_slice(&[0, 0, 0, 0, 16]);
        first.extend_from_slice(a);
        first.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&frame_header(
            first.len(),
            HEADERS,
            PADDED | PRIORITY,
            stream,
        ));
        out.extend_from_slice(&first);
        out.extend_from_slice(&frame_header(b.len(), CONTINUATION, END_HEADERS, stream));
        out.extend_from_slice(b);
        out.extend_from_slice(&frame_header(3, 0x0, END_STREAM, stream));
        out.extend_from_slice(b"abc");
        out
    }

    async fn relayed(input: Vec<u8>) -> Vec<u8> {
        let mut out = Vec::new();
        mend_requests(input.as_slice(), &mut out).await.unwrap();
        out
    }

    /// The header fields and the frames (kind, flags) the server receives.
    async fn server_view(input: Vec<u8>) -> (Vec<(Vec<u8>, Vec<u8>)>, Vec<(u8, u8)>, Vec<u8>) {
        let out = relayed(input).await;
        assert_eq!(&out[..24], PREFACE);
        let mut r = &out[24..];
        let mut block = Vec::new();
        let mut kinds = Vec::new();
        let mut data = Vec::new();
        while let Some(f) = read_frame(&mut r).await.unwrap() {
            assert!(f.payload.len() <= MAX_FRAME);
            kinds.push((f.kind, f.flags));
            match f.kind {
                HEADERS => block.extend_from_slice(&headers_fragment(&f).unwrap().1),
                CONTINUATION => block.extend_from_slice(&f.payload),
                _ => data.extend_from_slice(&f.payload),
            }
        }
        let got = Decoder::new()
            .decode(&block)
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>();
        (got, kinds, data)
    }

    #[tokio::test]
    async fn a_socket_path_authority_becomes_localhost_and_the_rest_is_kept() {
        for bad in [
            &b"%2Fvar%2Flib%2Fkubelet%2Fdevice-plugins%2Fx.sock"[..],
            b"/var/lib/kubelet/device-plugins/x.sock",
            b"",
        ] {
            let (got, kinds, data) = server_view(client_bytes(bad)).await;
            let mut want = fields(bad);
            want[3].1 = LOCALHOST.to_vec();
            assert_eq!(got, want);
            assert_eq!(data, b"abc");
            assert_eq!(
                kinds[0],
                (HEADERS, PRIORITY),
                "END_HEADERS comes on the last"
            );
            assert_eq!(kinds[kinds.len() - 2], (CONTINUATION, END_HEADERS));
            assert_eq!(kinds[kinds.len() - 1], (0, END_STREAM));
        }
    }

    #[tokio::test]
    async fn a_valid_authority_is_kept() {
        for good in [&b"localhost"[..], b"plugin:80", b"[::1]:443"] {
            let (got, _, _) = server_view(client_bytes(good)).await;
            assert_eq!(got, fields(good));
        }
    }

    #[tokio::test]
    async fn a_broken_header_block_ends_the_connection() {
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame_header(1, HEADERS, END_HEADERS, [0, 0, 0, 1]));
        input.push(0xff);
        let mut out = Vec::new();
        assert!(mend_requests(input.as_slice(), &mut out).await.is_err());
    }

    #[tokio::test]
    async fn what_is_not_http2_passes_unchanged() {
        let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(relayed(input.clone()).await, input);
    }
}
