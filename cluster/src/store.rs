//! The etcd connection every cluster component uses: bounded requests (a partitioned caller gets an error, never
//! a hang), paged prefix reads at one revision, guarded batched transactions, and a request counter (the scheduler
//! benchmark reports etcd requests per unit from it).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, ConnectOptions, GetOptions, Identity, KeyValue, PutOptions, TlsOptions, Txn, TxnOp,
    WatchOptions, WatchStream,
};

/// etcd refuses transactions with more operations than this (its `--max-txn-ops` default).
pub const MAX_TXN_OPS: usize = 128;

/// Keys per page of a prefix read (keeps each response far below gRPC's 4 MiB message limit).
const PAGE: i64 = 2_000;

/// An error talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The etcd client failed (connection, timeout, server error).
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    /// A TLS file could not be read.
    #[error("reading {path}: {source}")]
    Tls {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The guard of a transaction failed (the caller lost the right to write).
    #[error("transaction guard failed: {0}")]
    Fenced(String),
}

impl StoreError {
    /// Whether etcd said the lease a request named no longer exists (it expired while we were cut off).
    pub fn lease_gone(&self) -> bool {
        match self {
            StoreError::Etcd(etcd_client::Error::GRpcStatus(s)) => {
                s.code() == tonic::Code::NotFound && s.message().contains("lease not found")
            }
            _ => false,
        }
    }
}

/// TLS material for etcd (`--ca-file`, `--cert-file`, `--key-file`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA bundle that signed the etcd servers' certificates.
    pub ca: Option<String>,
    /// Client certificate.
    pub cert: Option<String>,
    /// Client key.
    pub key: Option<String>,
}

/// Counts of what a [`Store`] asked of etcd.
#[derive(Debug, Default)]
pub struct Stats {
    requests: AtomicU64,
    retries: AtomicU64,
    watch_events: AtomicU64,
}

impl Stats {
    /// Unary requests sent (gets, puts, deletes, transactions, lease grants and keep-alives).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests sent again after a failure a retry may cure (no leader, a member gone): elections show here.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Watch events received.
    pub fn watch_events(&self) -> u64 {
        self.watch_events.load(Ordering::Relaxed)
    }

    /// Records `n` requests.
    pub fn request(&self, n: u64) {
        self.requests.fetch_add(n, Ordering::Relaxed);
    }

    /// Records `n` watch events.
    pub fn watched(&self, n: u64) {
        self.watch_events.fetch_add(n, Ordering::Relaxed);
    }
}

/// A connection to etcd. Clones share it, and [`Store::reconnect`] replaces it for all of them.
#[derive(Clone)]
pub struct Store {
    client: Arc<std::sync::RwLock<Client>>,
    endpoints: Arc<[String]>,
    stats: Arc<Stats>,
    timeout: Duration,
    retry_for: Duration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("timeout", &self.timeout)
            .field("retry_for", &self.retry_for)
            .finish_non_exhaustive()
    }
}

/// The end of the key range covering every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Whether a failed request may be sent again.
///
/// Any unavailability (a member refusing it for want of a leader, `--require-leader`, proposes nothing) and any
/// failure on the client's side of the connection (a status carrying the transport error that made it: refused,
/// reset, broken pipe, a request dropped unsent from a closed connection, the request's own timeout), which is
/// what a dead member behind the balanced channel, or a member still following a leader that just died, looks
/// like. Statuses etcd itself sent (no source) are final.
///
/// Writes are retried too, though one that timed out may have landed: every write herd makes is either
/// idempotent (put, delete, a guard-less batch) or guarded by a revision compare, so a retry of a write that did
/// land fails its guard instead of applying twice (callers that care read back: see `ClusterClient::submit`).
fn retryable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable || std::error::Error::source(s).is_some()
        }
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

/// How long a daemon's request is retried for by default: long enough to ride out an etcd leader election (1 s
/// election timeout by default, a few rounds when votes split) on top of the request's own bound, short enough
/// that an agent or engine cut off from its members notices within its lease's TTL. An operator's command waits
/// longer ([`Store::with_retry_for`]).
pub const RETRY_FOR: Duration = Duration::from_secs(4);

impl Store {
    /// Connects to `endpoints` (e.g. `http://127.0.0.1:2379`). Every request is bounded by `timeout`.
    pub async fn connect(endpoints: &[String], tls: &TlsFiles, timeout: Duration) -> Result<Store, StoreError> {
        let client = Client::connect(endpoints, Some(Self::options(tls, timeout)?)).await?;
        Ok(Store {
            client: Arc::new(std::sync::RwLock::new(client)),
            endpoints: endpoints.into(),
            stats: Arc::default(),
            timeout,
            retry_for: RETRY_FOR,
        })
    }

    /// A new connection to the same endpoints with the identity in `tls` (its certificate was renewed), used from
    /// now on by this store and every clone of it. Requests and watches already under way finish on the old one.
    /// etcd checks a client's certificate when a connection is made: without this, the next reconnection (a member
    /// restarting, a network blip) would present the old certificate, which ends.
    pub async fn reconnect(&self, tls: &TlsFiles) -> Result<(), StoreError> {
        let client = Client::connect(&self.endpoints[..], Some(Self::options(tls, self.timeout)?)).await?;
        *self.client.write().unwrap_or_else(std::sync::PoisonError::into_inner) = client;
        Ok(())
    }

    fn options(tls: &TlsFiles, timeout: Duration) -> Result<ConnectOptions, StoreError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            // A member that died without closing its connections (a power cut) is found by the HTTP/2 pings; etcd
            // answers pings more often than every 5 s (--grpc-keepalive-min-time) with GOAWAY.
            .with_keep_alive(Duration::from_secs(6), timeout.min(Duration::from_secs(3)))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if tls.ca.is_some() || tls.cert.is_some() {
            let read =
                |path: &String| std::fs::read(path).map_err(|source| StoreError::Tls { path: path.clone(), source });
            let mut t = TlsOptions::new();
            if let Some(ca) = &tls.ca {
                t = t.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(t);
        }
        Ok(options)
    }

    /// Runs `op` again (spaced 50 ms, 100 ms, ... up to 400 ms) while it fails with a [`retryable`] error, for at
    /// most this connection's retry window, counting each new attempt in [`Stats::retries`].
    async fn retry<T, F, Fut>(&self, mut op: F) -> Result<T, etcd_client::Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = tokio::time::Instant::now();
        let mut attempt = 0u64;
        loop {
            match op().await {
                Err(e) if started.elapsed() < self.retry_for && retryable(&e) => {
                    attempt += 1;
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50 * attempt.min(8))).await;
                }
                other => return other,
            }
        }
    }

    /// Another handle on the same connection that counts into its own [`Stats`].
    pub fn with_own_stats(&self, stats: Arc<Stats>) -> Store {
        Store { stats, ..self.clone() }
    }

    /// This connection, retrying a request that fails for want of a leader (or of a member) for `retry_for`
    /// instead of [`RETRY_FOR`]: an operator's command rides out even a slow election (on loaded machines votes
    /// can split for several rounds, each answered `etcdserver: leader changed`) rather than failing with it.
    pub fn with_retry_for(self, retry_for: Duration) -> Store {
        Store { retry_for, ..self }
    }

    /// The request counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The per-request bound.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The raw client (for watches and leases).
    pub fn client(&self) -> Client {
        self.client.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Every key under `prefix` at one revision, in key order, read in pages. Returns the pairs and the revision.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        self.get_prefix_at(prefix, 0).await
    }

    /// Every key under `prefix` at `revision` (0: the newest, whose revision is returned).
    pub async fn get_prefix_at(&self, prefix: &str, mut revision: i64) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let client = self.client();
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        let mut out = Vec::new();
        loop {
            self.stats.request(1);
            let options = GetOptions::new().with_range(end.clone()).with_limit(PAGE).with_revision(revision);
            let mut resp = self
                .retry(|| {
                    let (mut c, from, options) = (client.clone(), from.clone(), options.clone());
                    async move { c.get(from, Some(options)).await }
                })
                .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            if let Some(last) = kvs.last() {
                from = last.key().to_vec();
                from.push(0);
            }
            out.extend(kvs);
            if !more {
                return Ok((out, revision));
            }
        }
    }

    /// How many keys start with `prefix`.
    pub async fn count(&self, prefix: &str) -> Result<i64, StoreError> {
        self.stats.request(1);
        let end = prefix_end(prefix.as_bytes());
        let resp = self
            .retry(|| {
                let (mut c, end) = (self.client(), end.clone());
                async move { c.get(prefix, Some(GetOptions::new().with_range(end).with_count_only())).await }
            })
            .await?;
        Ok(resp.count())
    }

    /// One key's value and mod revision.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.stats.request(1);
        let mut resp = self
            .retry(|| {
                let mut c = self.client();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(resp.take_kvs().into_iter().next())
    }

    /// Puts one key.
    pub async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> Result<(), StoreError> {
        self.stats.request(1);
        let options = lease.map(|l| PutOptions::new().with_lease(l));
        self.retry(|| {
            let (mut c, value, options) = (self.client(), value.clone(), options.clone());
            async move { c.put(key, value, options).await }
        })
        .await?;
        Ok(())
    }

    /// Deletes every key under `prefix`; returns how many.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<i64, StoreError> {
        self.stats.request(1);
        let end = prefix_end(prefix.as_bytes());
        let resp = self
            .retry(|| {
                let (mut c, end) = (self.client(), end.clone());
                async move { c.delete(prefix, Some(etcd_client::DeleteOptions::new().with_range(end))).await }
            })
            .await?;
        Ok(resp.deleted())
    }

    /// Deletes one key; true if it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.stats.request(1);
        Ok(self
            .retry(|| {
                let mut c = self.client();
                async move { c.delete(key, None).await }
            })
            .await?
            .deleted()
            > 0)
    }

    /// Runs `ops` in transactions of at most [`MAX_TXN_OPS`], up to 4 in flight, each guarded by `guard` (all
    /// must hold). The keys of `ops` must be distinct (batches may land in any order). A failed guard ends with
    /// [`StoreError::Fenced`]; batches that landed stay applied.
    pub async fn apply(&self, ops: Vec<TxnOp>, guard: &[Compare]) -> Result<(), StoreError> {
        use futures::StreamExt as _;
        let mut batches = Vec::with_capacity(ops.len().div_ceil(MAX_TXN_OPS));
        let mut ops = ops.into_iter().peekable();
        while ops.peek().is_some() {
            batches.push(ops.by_ref().take(MAX_TXN_OPS).collect::<Vec<TxnOp>>());
        }
        let mut results = futures::stream::iter(batches)
            .map(|batch| {
                let txn = Txn::new().when(guard.to_vec()).and_then(batch);
                async move {
                    self.stats.request(1);
                    let resp = self
                        .retry(|| {
                            let (mut c, txn) = (self.client(), txn.clone());
                            async move { c.txn(txn).await }
                        })
                        .await?;
                    if resp.succeeded() { Ok(()) } else { Err(StoreError::Fenced("the guarding key changed".into())) }
                }
            })
            .buffer_unordered(4);
        while let Some(r) = results.next().await {
            r?;
        }
        Ok(())
    }

    /// Runs one transaction.
    pub async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        self.stats.request(1);
        Ok(self
            .retry(|| {
                let (mut c, txn) = (self.client(), txn.clone());
                async move { c.txn(txn).await }
            })
            .await?)
    }

    /// Opens one watch stream on every `(prefix, start revision)`, retrying as other requests do. Events come
    /// without their previous value: nothing in herd reads it, and etcd would read it back for every event.
    pub async fn watch_prefixes(&self, from: &[(String, i64)]) -> Result<WatchStream, StoreError> {
        self.stats.request(from.len() as u64);
        let options = |prefix: &str, start: i64| {
            WatchOptions::new().with_range(prefix_end(prefix.as_bytes())).with_start_revision(start)
        };
        Ok(self
            .retry(|| {
                let mut c = self.client();
                async move {
                    let mut stream: Option<WatchStream> = None;
                    for (prefix, start) in from {
                        match stream.as_mut() {
                            None => stream = Some(c.watch(prefix.as_str(), Some(options(prefix, *start))).await?),
                            Some(s) => s.watch(prefix.as_str(), Some(options(prefix, *start))).await?,
                        }
                    }
                    stream.ok_or_else(|| etcd_client::Error::WatchError("nothing to watch".into()))
                }
            })
            .await?)
    }

    /// Grants a lease of `ttl` (whole seconds, at least 1); returns its id and granted TTL.
    pub async fn grant(&self, ttl: Duration) -> Result<(i64, Duration), StoreError> {
        self.stats.request(1);
        let secs = ttl.as_secs().max(1) as i64;
        let resp = self
            .retry(|| {
                let mut c = self.client();
                async move { c.lease_grant(secs, None).await }
            })
            .await?;
        Ok((resp.id(), Duration::from_secs(resp.ttl().max(0) as u64)))
    }

    /// Revokes a lease (its keys go at once).
    pub async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        self.stats.request(1);
        self.client().lease_revoke(lease).await?;
        Ok(())
    }
}

/// A lease kept alive over one keep-alive stream, re-opened after errors.
pub struct KeepAlive {
    store: Store,
    lease: i64,
    stream: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
}

impl std::fmt::Debug for KeepAlive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeepAlive").field("lease", &self.lease).finish_non_exhaustive()
    }
}

impl KeepAlive {
    /// Keeps `lease` alive through `store`.
    pub fn new(store: &Store, lease: i64) -> KeepAlive {
        KeepAlive { store: store.clone(), lease, stream: None }
    }

    /// The lease.
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// Renews once, bounded by the store's timeout. Ok(remaining TTL): zero means the lease is gone.
    pub async fn renew(&mut self) -> Result<Duration, StoreError> {
        let result = tokio::time::timeout(self.store.timeout, self.renew_inner()).await;
        match result {
            Ok(Ok(ttl)) => Ok(ttl),
            Ok(Err(e)) => {
                self.stream = None;
                Err(e)
            }
            Err(_) => {
                self.stream = None;
                Err(StoreError::Etcd(etcd_client::Error::LeaseKeepAliveError("keep-alive timed out".into())))
            }
        }
    }

    async fn renew_inner(&mut self) -> Result<Duration, StoreError> {
        if self.stream.is_none() {
            self.store.stats.request(1);
            self.stream = Some(self.store.client().lease_keep_alive(self.lease).await?);
        }
        let Some((keeper, stream)) = self.stream.as_mut() else {
            return Err(StoreError::Fenced("no keep-alive stream".into()));
        };
        self.store.stats.request(1);
        keeper.keep_alive().await?;
        match stream.message().await? {
            Some(resp) => Ok(Duration::from_secs(resp.ttl().max(0) as u64)),
            None => Err(StoreError::Etcd(etcd_client::Error::LeaseKeepAliveError("stream closed".into()))),
        }
    }
}
