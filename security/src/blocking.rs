//! TLS over a blocking socket read by one thread and written by another (the data plane keeps
//! a reader and a writer thread per connection).
//!
//! Both halves share the rustls connection behind a lock, held only to move bytes in or out of
//! it, never while waiting on the socket: the reader waits for ciphertext without the lock, and
//! a writer takes the ciphertext out under the lock and sends it under a second lock (taken
//! before the first is released, so records leave in the order they were made). A peer that
//! stops reading therefore cannot stop this side from reading.
use parking_lot::{Mutex, MutexGuard};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;

use crate::tls::ClientAuth;
use crate::{INTERNAL_NAME, Tls};

/// The two halves of a connection and a handle that shuts it down.
pub struct Duplex {
    /// Plaintext in.
    pub reader: Box<dyn Read + Send>,
    /// Plaintext out.
    pub writer: Box<dyn Write + Send>,
    /// The socket, to shut down both halves.
    pub socket: TcpStream,
}

impl Duplex {
    /// A connection without TLS.
    pub fn plain(socket: TcpStream) -> io::Result<Duplex> {
        Ok(Duplex {
            reader: Box::new(socket.try_clone()?),
            writer: Box::new(socket.try_clone()?),
            socket,
        })
    }

    /// The client end of a connection between two processes of the cluster: the server must
    /// show a certificate of the cluster's CA naming [`INTERNAL_NAME`], and this side presents
    /// its own.
    pub fn client(socket: TcpStream, tls: &Tls) -> io::Result<Duplex> {
        let name = ServerName::try_from(INTERNAL_NAME).map_err(io::Error::other)?;
        let conn =
            rustls::ClientConnection::new(tls.client_config(), name).map_err(io::Error::other)?;
        Self::tls(socket, conn.into())
    }

    /// The server end of a connection between two processes of the cluster: the client must
    /// present a certificate of the cluster's CA.
    pub fn server(socket: TcpStream, tls: &Tls) -> io::Result<Duplex> {
        let conn = rustls::ServerConnection::new(tls.server_config(ClientAuth::Required)?)
            .map_err(io::Error::other)?;
        Self::tls(socket, conn.into())
    }

    fn tls(mut socket: TcpStream, mut conn: rustls::Connection) -> io::Result<Duplex> {
        socket.set_read_timeout(Some(Duration::from_secs(10)))?;
        socket.set_write_timeout(Some(Duration::from_secs(10)))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut socket)
                .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
        }
        socket.set_read_timeout(None)?;
        socket.set_write_timeout(None)?;
        let shared = Arc::new(Shared {
            conn: Mutex::new(conn),
            out: Mutex::new(socket.try_clone()?),
        });
        Ok(Duplex {
            reader: Box::new(TlsReader {
                shared: shared.clone(),
                socket: socket.try_clone()?,
                buf: vec![0; 64 << 10],
                pos: 0,
                len: 0,
                eof: false,
            }),
            writer: Box::new(TlsWriter { shared }),
            socket,
        })
    }

    /// Ends both directions (a blocked reader or writer returns).
    pub fn shutdown(&self) {
        let _ = self.socket.shutdown(Shutdown::Both);
    }
}

struct Shared {
    conn: Mutex<rustls::Connection>,
    out: Mutex<TcpStream>,
}

/// Sends what the connection has to send. The socket lock is taken before the connection's is
/// released, so concurrent senders keep the records in order.
fn send_pending(shared: &Shared, mut conn: MutexGuard<'_, rustls::Connection>) -> io::Result<()> {
    if !conn.wants_write() {
        return Ok(());
    }
    let mut bytes = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut bytes)?;
    }
    let mut out = shared.out.lock();
    drop(conn);
    out.write_all(&bytes)
}

struct TlsReader {
    shared: Arc<Shared>,
    socket: TcpStream,
    /// Ciphertext read from the socket, `pos..len` not yet given to rustls.
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    eof: bool,
}

impl Read for TlsReader {
    fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        if dst.is_empty() {
            return Ok(0);
        }
        loop {
            let mut conn = self.shared.conn.lock();
            match conn.reader().read(dst) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if self.pos < self.len {
                let mut pending = &self.buf[self.pos..self.len];
                let n = conn.read_tls(&mut pending)?;
                self.pos += n;
                if let Err(e) = conn.process_new_packets() {
                    // the alert rustls queued tells the peer why
                    let _ = send_pending(&self.shared, conn);
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
                send_pending(&self.shared, conn)?;
                continue;
            }
            if self.eof {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            drop(conn);
            let n = self.socket.read(&mut self.buf)?;
            (self.pos, self.len) = (0, n);
            if n == 0 {
                self.eof = true;
                let mut conn = self.shared.conn.lock();
                conn.read_tls(&mut &[][..])?;
                conn.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                // the plaintext reader now says whether the end was clean (close_notify)
                match conn.reader().read(dst) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    r => return r,
                }
            }
        }
    }
}

struct TlsWriter {
    shared: Arc<Shared>,
}

impl Write for TlsWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut conn = self.shared.conn.lock();
        let n = conn.writer().write(data)?;
        send_pending(&self.shared, conn)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut conn = self.shared.conn.lock();
        conn.writer().flush()?;
        send_pending(&self.shared, conn)
    }
}

impl Drop for TlsWriter {
    fn drop(&mut self) {
        let mut conn = self.shared.conn.lock();
        conn.send_close_notify();
        let _ = send_pending(&self.shared, conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs;

    fn tls(dir: &std::path::Path, g: &certs::Generated) -> Arc<Tls> {
        let files = g.write(dir).unwrap();
        Tls::from_files(files).unwrap()
    }

    fn pattern(i: usize) -> u8 {
        (i % 251) as u8
    }

    /// Both ends write a lot at once: neither may stall the other, and every byte arrives.
    #[test]
    fn a_tls_connection_carries_both_directions_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let g = certs::generate(&[], 1).unwrap();
        let tls = tls(dir.path(), &g);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server_tls = tls.clone();
        const N: usize = 8 << 20;
        let exchange = |d: Duplex| {
            let Duplex {
                mut reader,
                mut writer,
                ..
            } = d;
            let w = std::thread::spawn(move || {
                let data: Vec<u8> = (0..N).map(pattern).collect();
                for chunk in data.chunks(10_007) {
                    writer.write_all(chunk).unwrap();
                }
                writer.flush().unwrap();
                drop(writer);
            });
            let mut got = Vec::new();
            reader.read_to_end(&mut got).unwrap();
            w.join().unwrap();
            got
        };
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            exchange(Duplex::server(s, &server_tls).unwrap())
        });
        let client = exchange(Duplex::client(TcpStream::connect(addr).unwrap(), &tls).unwrap());
        let server = server.join().unwrap();
        for got in [client, server] {
            assert_eq!(got.len(), N);
            assert!(got.iter().enumerate().all(|(i, b)| *b == pattern(i)));
        }
    }

    #[test]
    fn a_peer_without_a_certificate_of_the_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ours = tls(&dir.path().join("a"), &certs::generate(&[], 1).unwrap());
        let theirs = tls(&dir.path().join("b"), &certs::generate(&[], 1).unwrap());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            Duplex::server(s, &ours).map(|_| ())
        });
        let client = Duplex::client(TcpStream::connect(addr).unwrap(), &theirs);
        assert!(client.is_err(), "a client trusting another CA connected");
        let err = server.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("TLS handshake"), "{err}");
    }
}
