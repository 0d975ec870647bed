//! TLS over tokio streams: the connections a gRPC or HTTP server accepts ([`Incoming`]) and the
//! ones a gRPC client makes ([`Dialer`]), plain when no TLS is configured.
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

pub use crate::tls::ClientAuth;
use crate::{Error, Peer, Result, Tls};

/// How long a client may take to complete a TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// A connection a server accepted.
pub enum ServerStream {
    /// Without TLS.
    Plain(TcpStream),
    /// Through TLS.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl ServerStream {
    /// Who is at the other end.
    pub fn peer(&self) -> Peer {
        match self {
            ServerStream::Plain(s) => Peer {
                addr: s.peer_addr().ok(),
                certified: false,
            },
            ServerStream::Tls(s) => {
                let (tcp, conn) = s.get_ref();
                Peer {
                    addr: tcp.peer_addr().ok(),
                    // rustls verified the chain against the CA before the handshake completed
                    certified: conn.peer_certificates().is_some_and(|c| !c.is_empty()),
                }
            }
        }
    }
}

impl tonic::transport::server::Connected for ServerStream {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer()
    }
}

/// Forwards the tokio I/O traits to whichever stream an enum holds.
macro_rules! forward_io {
    ($t:ident) => {
        impl AsyncRead for $t {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $t::Plain(s) => Pin::new(s).poll_read(cx, buf),
                    $t::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
                }
            }
        }

        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $t::Plain(s) => Pin::new(s).poll_write(cx, buf),
                    $t::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
                }
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $t::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    $t::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    $t::Plain(s) => s.is_write_vectored(),
                    $t::Tls(s) => s.is_write_vectored(),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $t::Plain(s) => Pin::new(s).poll_flush(cx),
                    $t::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $t::Plain(s) => Pin::new(s).poll_shutdown(cx),
                    $t::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
                }
            }
        }
    };
}

forward_io!(ServerStream);
forward_io!(ClientStream);

/// The connections a listener accepts, through TLS when configured. Handshakes run
/// concurrently with a deadline, so a slow or hostile client holds up no one else; a failed
/// handshake is logged with the client's address and the connection dropped.
pub struct Incoming {
    rx: mpsc::Receiver<ServerStream>,
    addr: SocketAddr,
}

impl Incoming {
    /// Starts accepting on `listener` (call inside a tokio runtime).
    pub fn new(listener: TcpListener, tls: Option<(Arc<Tls>, ClientAuth)>) -> io::Result<Incoming> {
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, from) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            warn!(%addr, error = %e, "accepting a connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                    _ = tx.closed() => return,
                };
                let _ = tcp.set_nodelay(true);
                let Some((tls, auth)) = &tls else {
                    if tx.send(ServerStream::Plain(tcp)).await.is_err() {
                        return;
                    }
                    continue;
                };
                let config = match tls.server_config(*auth) {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(%addr, error = %e, "cannot accept TLS connections");
                        continue;
                    }
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
                    match tokio::time::timeout(HANDSHAKE, accept).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send(ServerStream::Tls(Box::new(s))).await;
                        }
                        Ok(Err(e)) => {
                            info!(%addr, %from, error = %e, "refused a connection: TLS handshake failed")
                        }
                        Err(_) => {
                            info!(%addr, %from, "refused a connection: no TLS handshake within {HANDSHAKE:?}")
                        }
                    }
                });
            }
        });
        Ok(Incoming { rx, addr })
    }

    /// The next connection.
    pub async fn next(&mut self) -> Option<ServerStream> {
        self.rx.recv().await
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// As a stream, for `tonic::transport::Server::serve_with_incoming`.
    pub fn into_stream(self) -> impl futures::Stream<Item = io::Result<ServerStream>> {
        futures::stream::unfold(
            self,
            |mut i| async move { i.next().await.map(|s| (Ok(s), i)) },
        )
    }
}

/// A connection a client made.
pub enum ClientStream {
    /// Without TLS.
    Plain(TcpStream),
    /// Through TLS.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Makes gRPC channels, through TLS when configured. The server's certificate must name
/// `server_name`, or else the host dialled.
#[derive(Clone, Debug, Default)]
pub struct Dialer {
    tls: Option<Arc<Tls>>,
    server_name: Option<String>,
}

impl Dialer {
    /// A dialer using `tls` (plain TCP if `None`).
    pub fn new(tls: Option<Arc<Tls>>, server_name: Option<String>) -> Dialer {
        Dialer { tls, server_name }
    }

    /// Whether channels use TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The endpoint of `addr` (`host:port`, or a URL).
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint> {
        let url = match addr.split_once("://") {
            Some((_, rest)) => format!("http://{rest}"),
            None => format!("http://{addr}"),
        };
        Endpoint::from_shared(url).map_err(|e| Error(format!("bad address {addr}: {e}")))
    }

    /// Connects now.
    pub async fn connect(
        &self,
        endpoint: Endpoint,
    ) -> std::result::Result<Channel, tonic::transport::Error> {
        endpoint.connect_with_connector(self.clone()).await
    }

    /// Connects on first use (and again after a failure).
    pub fn connect_lazy(&self, endpoint: Endpoint) -> Channel {
        endpoint.connect_with_connector_lazy(self.clone())
    }
}

impl tower::Service<http::Uri> for Dialer {
    type Response = TokioIo<ClientStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "no host in the address")
                })?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(80);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let Some(tls) = &this.tls else {
                return Ok(TokioIo::new(ClientStream::Plain(tcp)));
            };
            let name = this.server_name.clone().unwrap_or(host);
            let name = ServerName::try_from(name.clone()).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{name} is not a valid TLS server name"),
                )
            })?;
            let connect = tokio_rustls::TlsConnector::from(tls.client_config()).connect(name, tcp);
            let s = tokio::time::timeout(HANDSHAKE, connect)
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            Ok(TokioIo::new(ClientStream::Tls(Box::new(s))))
        })
    }
}
