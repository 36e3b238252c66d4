//! Starts a real sandbox server and gives tests pre-authenticated request builders.

use std::future::Future;
use std::time::Duration;

use cx_sandbox::{
    DEFAULT_RETAINLY_KEY, DEFAULT_RETAINLY_SECRET, DEFAULT_RETENTLY_API_KEY, Sandbox,
    SandboxConfig, SandboxHandle,
};
use reqwest::{Method, RequestBuilder};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct TestSandbox {
    pub base: String,
    pub handle: SandboxHandle,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestSandbox {
    pub async fn start() -> TestSandbox {
        Self::start_with(SandboxConfig::default()).await
    }

    pub async fn start_with(config: SandboxConfig) -> TestSandbox {
        let sandbox = Sandbox::new(config);
        let handle = sandbox.handle().clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(sandbox.serve(listener, async move {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::builder()
            // Fault tests drop connections; a fresh connection per request keeps one test's
            // broken connection out of the next request.
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        TestSandbox {
            base,
            handle,
            client,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request with no credentials.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path))
    }

    /// A Retently request with the official header form.
    pub fn retently(&self, method: Method, path: &str) -> RequestBuilder {
        self.request(method, path).header(
            "Authorization",
            format!("api_key={DEFAULT_RETENTLY_API_KEY}"),
        )
    }

    pub async fn retently_get(&self, path: &str) -> (u16, Value) {
        let response = self.retently(Method::GET, path).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    pub async fn retently_send(&self, method: Method, path: &str, body: &Value) -> (u16, Value) {
        let response = self.retently(method, path).json(body).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// A Retainly request with the documented `key`/`secret` headers.
    pub fn retainly(&self, method: Method, path: &str) -> RequestBuilder {
        self.request(method, path)
            .header("key", DEFAULT_RETAINLY_KEY)
            .header("secret", DEFAULT_RETAINLY_SECRET)
    }

    /// Status and body (JSON, or `Null` when empty).
    pub async fn retainly_send(&self, method: Method, path: &str, body: &Value) -> (u16, Value) {
        let response = self.retainly(method, path).json(body).send().await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, body)
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

/// Waits for a condition that another task makes true, checking every 10 ms, for at most 5 s.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
