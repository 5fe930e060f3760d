//! A webhook receiver on a loopback port for tests: it records every
//! request and answers each as its script says (200 once the script is
//! used up), over HTTP/1.1 connections kept open between requests.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// How the receiver answers one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// This HTTP status.
    Status(u16),
    /// Nothing, ever (until the sender gives up).
    Hang,
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Received {
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// How it was answered.
    pub answer: Answer,
    /// When it had been read.
    pub at: std::time::Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

#[derive(Debug, Default)]
struct Shared {
    got: Mutex<Vec<Received>>,
    script: Mutex<VecDeque<Answer>>,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

/// A running receiver; it stops when dropped.
#[derive(Debug)]
pub struct Receiver {
    /// Its URL: `http://127.0.0.1:PORT/hook`.
    pub url: String,
    /// Its origin, `http://127.0.0.1:PORT`, to allow.
    pub origin: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = serve(conn, &s).await;
                });
            }
        });
        Self {
            url: format!("http://{addr}/hook"),
            origin: format!("http://{addr}"),
            shared,
            task,
        }
    }

    /// The next requests are answered so, in order.
    pub fn script(&self, answers: &[Answer]) {
        self.shared
            .script
            .lock()
            .expect("receiver lock")
            .extend(answers.iter().copied());
    }

    /// Every request so far, oldest first.
    pub fn got(&self) -> Vec<Received> {
        self.shared.got.lock().expect("receiver lock").clone()
    }

    /// The requests answered 2xx, oldest first.
    pub fn accepted(&self) -> Vec<Received> {
        self.got()
            .into_iter()
            .filter(|r| matches!(r.answer, Answer::Status(200..=299)))
            .collect()
    }

    /// The most requests it was ever handling at once.
    pub fn most_in_flight(&self) -> usize {
        self.shared.most_in_flight.load(Ordering::SeqCst)
    }
}

/// Serves the requests of one connection, kept open between them, until
/// the sender closes it or a request is left unanswered.
async fn serve(mut conn: TcpStream, s: &Shared) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let headers: BTreeMap<String, String> = head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body: Vec<u8> = buf.drain(..head_end + len).skip(head_end).collect();
        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.most_in_flight.fetch_max(now, Ordering::SeqCst);
        let answer = s
            .script
            .lock()
            .expect("receiver lock")
            .pop_front()
            .unwrap_or(Answer::Status(200));
        s.got.lock().expect("receiver lock").push(Received {
            headers,
            body,
            answer,
            at: std::time::Instant::now(),
        });
        let result = match answer {
            Answer::Status(code) => {
                conn.write_all(format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await
            }
            Answer::Hang => {
                // Until the sender hangs up.
                let mut sink = [0u8; 64];
                let _ = tokio::time::timeout(Duration::from_secs(60), conn.read(&mut sink)).await;
                s.in_flight.fetch_sub(1, Ordering::SeqCst);
                return Ok(());
            }
        };
        s.in_flight.fetch_sub(1, Ordering::SeqCst);
        result?;
    }
}
