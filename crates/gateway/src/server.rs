//! The accept loop: HTTP/1.1 and HTTP/2 over one listener, with the connection-level limits
//! that tower layers cannot express (open connections, header read timeout, header size) and a
//! graceful drain on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use sitegate_model::config::LimitsConfig;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::layers::{ClientAddr, PeerOrigin};
use crate::limits::{serve_client_connection, ClientConnection, ClientIo};
use crate::tls::{ClientApiTls, PeerTls};

/// What a listener speaks below HTTP.
#[derive(Clone)]
pub(crate) enum Transport {
    /// The client API: plain TCP (TLS is terminated in front, if at all).
    Plain,
    /// The peer link: TLS 1.3 with a required client certificate naming a configured peer.
    PeerLink(Arc<PeerTls>),
    /// The client API over HTTPS (`listen.tls_cert`): TLS 1.2+, no client certificate.
    ClientTls(Arc<ClientApiTls>),
}

/// The least room hyper's parser keeps for a request head; larger heads get a bare 431 from
/// hyper. It is only a backstop: `limits.max_header_bytes`, well below it, is enforced by
/// `limits::header_size`, which answers 431 with the envelope.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Room for the request line beside the headers: hyper refuses longer URIs (414) itself.
const REQUEST_LINE_ROOM: usize = 64 * 1024;
/// Room for what the header count does not see (whitespace around values).
const HEAD_SLACK: usize = 8 * 1024;

/// hyper's cap on a request head: above any head whose URI hyper accepts and whose headers
/// are within `max_header_bytes`, so that such a request always reaches the layer that
/// answers with the envelope.
fn head_buffer_bytes(max_header_bytes: usize) -> usize {
    MAX_HEADER_BYTES.max(
        max_header_bytes
            .saturating_add(REQUEST_LINE_ROOM)
            .saturating_add(HEAD_SLACK),
    )
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct ServeLimits {
    pub(crate) max_connections: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) shutdown_grace: Duration,
    /// `limits.max_header_bytes`, from which hyper's own backstop is derived.
    pub(crate) max_header_bytes: usize,
}

impl From<&LimitsConfig> for ServeLimits {
    fn from(l: &LimitsConfig) -> Self {
        ServeLimits {
            max_connections: l.max_connections,
            header_read_timeout: Duration::from_secs(l.header_read_timeout_secs),
            shutdown_grace: Duration::from_secs(l.shutdown_grace_secs),
            max_header_bytes: l.max_header_bytes,
        }
    }
}

/// The router as a hyper service that stamps each request with where it came from.
fn service(
    app: Router,
    client: std::net::SocketAddr,
    origin: Option<PeerOrigin>,
    connection: Option<Arc<ClientConnection>>,
) -> TowerToHyperService<
    impl tower::Service<
            hyper::Request<Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
            Future = impl Future<Output = Result<axum::response::Response, std::convert::Infallible>>
                         + Send,
        > + Clone,
> {
    TowerToHyperService::new(tower::service_fn(
        move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ClientAddr(client));
            if let Some(origin) = &origin {
                req.extensions_mut().insert(origin.clone());
            }
            // The connection's limits need to know when requests start and are answered.
            let in_flight = connection.as_ref().map(|c| c.request_started());
            let answer = app.clone().oneshot(req);
            async move {
                let answer = answer.await;
                drop(in_flight);
                answer
            }
        },
    ))
}

/// The server half of a TLS handshake, run in the connection's own task and within the head
/// timeout, so a slow or hostile client cannot hold up others. A refusal is logged, not an
/// error: that client simply gets no connection.
async fn tls_handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    timeout: Duration,
    client: SocketAddr,
    listener: &'static str,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            tracing::info!(error = %e, %client, "{listener}: TLS handshake refused");
            None
        }
        Err(_) => {
            tracing::info!(%client, "{listener}: TLS handshake timed out");
            None
        }
    }
}

/// One client API connection, plain or after its TLS handshake. Anyone can connect here, so
/// the connection is watched for the time limits hyper does not apply (see
/// `limits::serve_client_connection`), counted on the decrypted bytes.
async fn serve_client<I>(
    stream: I,
    app: Router,
    client: SocketAddr,
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    head_timeout: Duration,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (io, watched) = ClientIo::new(stream);
    let service = service(app, client, None, Some(watched.connection()));
    let connection = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .into_owned();
    serve_client_connection(watcher.watch(connection), watched, head_timeout, client).await;
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and waits (at
/// most the grace period) for open connections to finish their requests.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    transport: Transport,
    shutdown: impl Future<Output = ()> + Send,
) {
    let head_buffer = head_buffer_bytes(limits.max_header_bytes);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(head_buffer)
        // Each response head in a buffer of its own: the client connection's socket wrapper
        // respells header names in heads only (see `http1_wire`).
        .writev(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(head_buffer).unwrap_or(u32::MAX));
    let graceful = GracefulShutdown::new();
    let connection_slots = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);

    loop {
        let slot = tokio::select! {
            slot = connection_slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let app = app.clone();
        let transport = transport.clone();
        let head_timeout = limits.header_read_timeout;
        // A task is as large as the largest future it may run, and a TLS connection's state
        // is several KiB: the TLS branches are boxed so a plain connection's task does not
        // carry them (measured with 1,000 plain connections: 11 KiB per task before).
        tokio::spawn(async move {
            match transport {
                Transport::Plain => {
                    serve_client(stream, app, client, &builder, watcher, head_timeout).await;
                }
                Transport::ClientTls(tls) => {
                    Box::pin(async move {
                        let tls = tls.acceptor();
                        let handshake =
                            tls_handshake(tls, stream, head_timeout, client, "client API");
                        if let Some(stream) = handshake.await {
                            serve_client(stream, app, client, &builder, watcher, head_timeout)
                                .await;
                        }
                    })
                    .await
                }
                Transport::PeerLink(tls) => Box::pin(async move {
                    let acceptor = tls.acceptor();
                    let handshake =
                        tls_handshake(acceptor, stream, head_timeout, client, "peer link");
                    let Some(stream) = handshake.await else {
                        return;
                    };
                    let origin = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .and_then(|cert| tls.identify_peer(cert));
                    // The verifier refuses any certificate that names no peer, so this is only
                    // reached for configured peers.
                    let Some(origin) = origin else { return };
                    let service = service(app, client, Some(PeerOrigin(origin)), None);
                    let connection = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned();
                    if let Err(e) = watcher.watch(connection).await {
                        tracing::debug!(error = %e, %client, "peer connection ended with an error");
                    }
                })
                .await,
            }
            drop(slot);
        });
    }

    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!("grace period over: dropping connections still open");
        }
    }
}
