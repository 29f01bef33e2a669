//! The little HTTP/1 server of the agent's metrics and of the viewer.

use std::{convert::Infallible, future::Future, sync::Arc};

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Answers every request on `listener` with `handle`, each connection in a
/// task of its own, until the runtime stops.
pub fn spawn<H, F>(listener: TcpListener, handle: H)
where
    H: Fn(Request<hyper::body::Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let handle = Arc::new(handle);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let handle = handle.clone();
            let service = service_fn(move |request| {
                let response = handle(request);
                async move { Ok::<_, Infallible>(response.await) }
            });
            tokio::spawn(async move {
                // A client that goes away is its own business.
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
}
