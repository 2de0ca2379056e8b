//! The "limit" baseline: a bare hyper HTTP/1.1 server answering every request with the same
//! bytes, captured from a real Get One answer. No routing, no authentication, no store: what
//! the machine and hyper can do at best, for the local-read scenarios to be measured against.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The answer the limit server gives to everything.
#[derive(Clone, Debug)]
pub struct FixedAnswer {
    pub body: Bytes,
    pub content_type: HeaderValue,
}

impl FixedAnswer {
    fn response(&self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(self.body.clone()));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, self.content_type.clone());
        response
    }
}

/// Serves `answer` on `listener` until the task is dropped or the process ends.
pub async fn serve(listener: TcpListener, answer: FixedAnswer) {
    let answer = Arc::new(answer);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Usually EMFILE: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_request| {
                let response = answer.response();
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
