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
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use sitegate_model::config::LimitsConfig;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::layers::{ClientAddr, PeerOrigin};
use crate::tls::PeerTls;

/// What a listener speaks below HTTP.
#[derive(Clone)]
pub enum Transport {
    /// The client API: plain TCP (TLS is terminated in front, if at all).
    Plain,
    /// The peer link: TLS 1.3 with a required client certificate naming a configured peer.
    PeerLink(Arc<PeerTls>),
}

/// The largest request head accepted; larger ones get 431 from hyper.
const MAX_HEADER_BYTES: usize = 64 * 1024;

#[derive(Clone, Copy, Debug)]
pub struct ServeLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub shutdown_grace: Duration,
}

impl From<&LimitsConfig> for ServeLimits {
    fn from(l: &LimitsConfig) -> Self {
        ServeLimits {
            max_connections: l.max_connections,
            header_read_timeout: Duration::from_secs(l.header_read_timeout_secs),
            shutdown_grace: Duration::from_secs(l.shutdown_grace_secs),
        }
    }
}

/// The router as a hyper service that stamps each request with where it came from.
fn service(
    app: Router,
    client: std::net::SocketAddr,
    origin: Option<PeerOrigin>,
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
            app.clone().oneshot(req)
        },
    ))
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and waits (at
/// most the grace period) for open connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    transport: Transport,
    shutdown: impl Future<Output = ()> + Send,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
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
        let handshake_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            match transport {
                Transport::Plain => {
                    let service = service(app, client, None);
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    if let Err(e) = watcher.watch(connection).await {
                        tracing::debug!(error = %e, %client, "connection ended with an error");
                    }
                }
                Transport::PeerLink(tls) => {
                    // The handshake runs here, not in the accept loop, so a slow or hostile
                    // client cannot hold up others.
                    let accepted =
                        tokio::time::timeout(handshake_timeout, tls.acceptor().accept(stream))
                            .await;
                    let stream = match accepted {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::info!(error = %e, %client, "peer link: TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%client, "peer link: TLS handshake timed out");
                            return;
                        }
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
                    let service = service(app, client, Some(PeerOrigin(origin)));
                    let connection = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned();
                    if let Err(e) = watcher.watch(connection).await {
                        tracing::debug!(error = %e, %client, "peer connection ended with an error");
                    }
                }
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
