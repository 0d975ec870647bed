//! The data plane between TaskManagers: channels to subtasks in other processes, over
//! long-lived TCP connections with credit-based flow control.
//!
//! A TaskManager keeps one outgoing connection per peer TaskManager; every channel from a
//! subtask here to a subtask there is multiplexed on it. Frames are
//! `[length u32][kind u8][channel u32][payload]`:
//!
//! - `OPEN` (sender → receiver): names a channel ([`ChannelKey`]) and its capacity. The receiver
//!   creates (or finds) the channel's local end and grants `capacity` credits.
//! - `DATA` (sender → receiver): one element (a batch as Arrow IPC, or a watermark, barrier,
//!   end-of-input...). A channel's batches form one Arrow IPC stream: its schema (and each
//!   dictionary) travels once, with the first batch that needs it, and the receiver keeps the
//!   stream's decoder per channel. A sender spends one credit per element and never sends
//!   without one, so the receiver's bounded channel always has room: the connection's reader
//!   never blocks, and a slow consumer holds back only its own channel, not the others sharing
//!   the connection.
//! - `CREDIT` (receiver → sender): the consuming subtask took elements; that many more may come.
//! - `CLOSE` (sender → receiver): the sending end went away without end-of-input (failure or
//!   cancellation); the consumer sees the channel closed.
//!
//! Elements keep their order because one channel's frames travel on one TCP stream. A broken
//! connection closes every channel on it, which fails the subtasks at both ends, and the
//! JobManager's restart strategy takes over.
use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

use arrow::buffer::Buffer;
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::StreamDecoder;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;
use freshet_control::JobId;
use freshet_engine::channel::{ChannelSender, CreditReturn, Outbound};
use freshet_engine::{Element, EngineError, Watermark};
use freshet_security::Tls;
use freshet_security::blocking::Duplex;

use crate::shuffle::{ChannelKey, LocalShuffle};

const OPEN: u8 = 1;
const DATA: u8 = 2;
const CREDIT: u8 = 3;
const CLOSE: u8 = 4;

/// Largest frame accepted (a batch bigger than this is a protocol error).
const MAX_FRAME: usize = 256 << 20;

/// The data plane of one TaskManager.
pub struct Network {
    address: SocketAddr,
    shuffle: Arc<LocalShuffle>,
    outgoing: Mutex<HashMap<String, Arc<Connection>>>,
    tls: Option<Arc<Tls>>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Network({})", self.address)
    }
}

impl Network {
    /// Listens on `listen` (`host:port`, port 0 for any) for connections from peers, delivering
    /// what arrives into `shuffle`.
    /// With `tls`, both ends of every connection must show a certificate of the cluster's CA.
    pub fn start(
        listen: &str,
        shuffle: Arc<LocalShuffle>,
        tls: Option<Arc<Tls>>,
    ) -> io::Result<Arc<Network>> {
        let listener = TcpListener::bind(listen)?;
        let address = listener.local_addr()?;
        let net = Arc::new(Network {
            address,
            shuffle,
            outgoing: Mutex::new(HashMap::new()),
            tls,
        });
        let weak = Arc::downgrade(&net);
        std::thread::Builder::new()
            .name("data-accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Some(net) = weak.upgrade() else { return };
                    match stream {
                        Ok(s) => {
                            let shuffle = net.shuffle.clone();
                            let tls = net.tls.clone();
                            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                            let _ = std::thread::Builder::new().name("data-in".into()).spawn(
                                move || {
                                    let _ = s.set_nodelay(true);
                                    let duplex = match &tls {
                                        Some(tls) => Duplex::server(s, tls),
                                        None => Duplex::plain(s),
                                    };
                                    match duplex {
                                        Err(e) => {
                                            warn!(%peer, error = %e, "refused a data connection")
                                        }
                                        Ok(d) => {
                                            if let Err(e) = serve_incoming(d, shuffle) {
                                                debug!(%peer, error = %e, "data connection ended");
                                            }
                                        }
                                    }
                                },
                            );
                        }
                        Err(e) => warn!(error = %e, "accepting a data connection"),
                    }
                }
            })?;
        info!(%address, "data plane listening");
        Ok(net)
    }

    /// Where peers connect.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The sending end of channel `key` to the TaskManager whose data plane listens at `peer`.
    pub fn sender(
        &self,
        peer: &str,
        key: ChannelKey,
        capacity: usize,
    ) -> freshet_engine::Result<ChannelSender> {
        let conn = self.connection(peer)?;
        let out = conn.open(&key, capacity as u32)?;
        Ok(ChannelSender::remote(out))
    }

    fn connection(&self, peer: &str) -> freshet_engine::Result<Arc<Connection>> {
        let live = |map: &HashMap<String, Arc<Connection>>| {
            map.get(peer)
                .filter(|c| !c.dead.load(Ordering::Acquire))
                .cloned()
        };
        if let Some(c) = live(&self.outgoing.lock()) {
            return Ok(c);
        }
        // connect without the lock: an unreachable peer must not hold up channels to others
        let context = || format!("connecting to the data plane of TaskManager {peer}");
        let stream = connect(peer)
            .and_then(|s| match &self.tls {
                Some(tls) => Duplex::client(s, tls),
                None => Duplex::plain(s),
            })
            .map_err(|e| EngineError::io(context(), e))?;
        let mut map = self.outgoing.lock();
        if let Some(c) = live(&map) {
            // another subtask connected meanwhile; this stream is dropped unused
            return Ok(c);
        }
        let c = Connection::start(stream, peer.to_string())
            .map_err(|e| EngineError::io(context(), e))?;
        map.insert(peer.to_string(), c.clone());
        Ok(c)
    }
}

fn connect(peer: &str) -> io::Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(peer) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Bytes the data plane of this process wrote to peers, frame headers included.
static BYTES_SENT: AtomicU64 = AtomicU64::new(0);
/// Bytes the data plane of this process read from peers, frame headers included.
static BYTES_RECEIVED: AtomicU64 = AtomicU64::new(0);

/// Bytes this process's data plane has sent and received so far (TLS overhead not counted).
pub fn bytes_transferred() -> (u64, u64) {
    (
        BYTES_SENT.load(Ordering::Relaxed),
        BYTES_RECEIVED.load(Ordering::Relaxed),
    )
}

/// Writes frames queued by any thread to a socket, flushing when the queue runs dry.
fn spawn_writer(
    writer: Box<dyn Write + Send>,
    socket: TcpStream,
    frames: Receiver<Vec<u8>>,
    dead: Arc<AtomicBool>,
    on_dead: impl FnOnce() + Send + 'static,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("data-out".into())
        .spawn(move || {
            let mut w = BufWriter::with_capacity(256 << 10, writer);
            let result = (|| -> io::Result<()> {
                while let Ok(frame) = frames.recv() {
                    w.write_all(&frame)?;
                    BYTES_SENT.fetch_add(frame.len() as u64, Ordering::Relaxed);
                    if frames.is_empty() {
                        w.flush()?;
                    }
                }
                w.flush()
            })();
            if let Err(e) = result {
                debug!(error = %e, "data connection write failed");
            }
            dead.store(true, Ordering::Release);
            let _ = socket.shutdown(std::net::Shutdown::Both);
            on_dead();
        })?;
    Ok(())
}

/// A frame whose payload `write` appends in place (no copy of a batch's bytes).
fn frame_with<E>(
    kind: u8,
    channel: u32,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<Vec<u8>, E> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&[0u8; 4]);
    f.push(kind);
    f.extend_from_slice(&channel.to_le_bytes());
    write(&mut f)?;
    let len = (f.len() - 4) as u32;
    f[..4].copy_from_slice(&len.to_le_bytes());
    Ok(f)
}

fn frame(kind: u8, channel: u32, payload: &[u8]) -> Vec<u8> {
    frame_with(kind, channel, |f| {
        f.extend_from_slice(payload);
        Ok::<_, std::convert::Infallible>(())
    })
    .unwrap_or_else(|e| match e {})
}

/// One frame as read: its kind, channel and the bytes after the header.
struct Frame {
    kind: u8,
    channel: u32,
    bytes: Vec<u8>,
}

impl Frame {
    fn payload(&self) -> &[u8] {
        &self.bytes[5..]
    }
}

/// Reads one frame. `None` at a clean end of stream.
fn read_frame(r: &mut impl Read) -> io::Result<Option<Frame>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if !(5..=MAX_FRAME).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad frame length {len}"),
        ));
    }
    // grown as the bytes arrive, so a length field alone reserves no memory
    let mut bytes = Vec::with_capacity(len.min(64 << 10));
    r.take(len as u64).read_to_end(&mut bytes)?;
    BYTES_RECEIVED.fetch_add(4 + bytes.len() as u64, Ordering::Relaxed);
    if bytes.len() < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some(Frame {
        kind: bytes[0],
        channel: u32::from_le_bytes(bytes[1..5].try_into().expect("4 bytes")),
        bytes,
    }))
}

/// An outgoing connection and the credits of its channels.
struct Connection {
    peer: String,
    frames: Sender<Vec<u8>>,
    channels: Mutex<HashMap<u32, Arc<Credits>>>,
    next: AtomicU32,
    dead: Arc<AtomicBool>,
}

impl Connection {
    fn start(stream: Duplex, peer: String) -> io::Result<Arc<Connection>> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let dead = Arc::new(AtomicBool::new(false));
        let conn = Arc::new(Connection {
            peer,
            frames: tx,
            channels: Mutex::new(HashMap::new()),
            next: AtomicU32::new(0),
            dead: dead.clone(),
        });
        let Duplex {
            reader,
            writer,
            socket,
        } = stream;
        let weak = Arc::downgrade(&conn);
        spawn_writer(writer, socket, rx, dead, move || {
            if let Some(c) = weak.upgrade() {
                c.close_all();
            }
        })?;
        let weak = Arc::downgrade(&conn);
        std::thread::Builder::new()
            .name("data-credit".into())
            .spawn(move || {
                let mut r = BufReader::new(reader);
                let result = (|| -> io::Result<()> {
                    while let Some(f) = read_frame(&mut r)? {
                        let (kind, channel, payload) = (f.kind, f.channel, f.payload());
                        let Some(conn) = weak.upgrade() else {
                            return Ok(());
                        };
                        if kind != CREDIT || payload.len() != 4 {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("unexpected frame kind {kind} from a receiver"),
                            ));
                        }
                        let n = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes"));
                        let credits = conn.channels.lock().get(&channel).cloned();
                        if let Some(c) = credits {
                            c.grant(n);
                        }
                    }
                    Ok(())
                })();
                if let Err(e) = &result {
                    debug!(error = %e, "data connection read failed");
                }
                if let Some(conn) = weak.upgrade() {
                    conn.dead.store(true, Ordering::Release);
                    conn.close_all();
                }
            })?;
        Ok(conn)
    }

    fn open(
        self: &Arc<Self>,
        key: &ChannelKey,
        capacity: u32,
    ) -> freshet_engine::Result<Arc<dyn Outbound>> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let credits = Arc::new(Credits::default());
        self.channels.lock().insert(id, credits.clone());
        let wire = WireKey {
            job: key.job.0.clone(),
            attempt: key.attempt,
            edge: key.edge as u32,
            from: key.from,
            to: key.to,
            capacity,
        };
        let payload =
            postcard::to_stdvec(&wire).map_err(|e| EngineError::Operator(e.to_string()))?;
        self.send(frame(OPEN, id, &payload))?;
        if self.dead.load(Ordering::Acquire) {
            credits.close();
        }
        Ok(Arc::new(RemoteSender {
            channel: id,
            credits,
            conn: self.clone(),
            ended: AtomicBool::new(false),
            encoder: Mutex::new(Encoder::default()),
        }))
    }

    fn send(&self, frame: Vec<u8>) -> freshet_engine::Result<()> {
        self.frames
            .send(frame)
            .map_err(|_| EngineError::ChannelClosed)
    }

    fn close_all(&self) {
        for c in self.channels.lock().values() {
            c.close();
        }
    }
}

/// The credit a sender holds on one channel.
#[derive(Default)]
struct Credits {
    available: Mutex<(u32, bool)>,
    changed: Condvar,
}

impl Credits {
    fn grant(&self, n: u32) {
        self.available.lock().0 += n;
        self.changed.notify_all();
    }

    fn close(&self) {
        self.available.lock().1 = true;
        self.changed.notify_all();
    }
}

/// The sending end of one remote channel.
struct RemoteSender {
    channel: u32,
    credits: Arc<Credits>,
    conn: Arc<Connection>,
    ended: AtomicBool,
    encoder: Mutex<Encoder>,
}

impl std::fmt::Debug for RemoteSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteSender({} #{})", self.conn.peer, self.channel)
    }
}

impl Outbound for RemoteSender {
    fn send_timeout(
        &self,
        e: Element,
        timeout: Duration,
    ) -> freshet_engine::Result<Option<Element>> {
        {
            let mut guard = self.credits.available.lock();
            if guard.0 == 0 && !guard.1 && !timeout.is_zero() {
                self.credits.changed.wait_while_for(
                    &mut guard,
                    |(n, closed)| *n == 0 && !*closed,
                    timeout,
                );
            }
            if guard.1 {
                return Err(EngineError::ChannelClosed);
            }
            if guard.0 == 0 {
                return Ok(Some(e));
            }
            guard.0 -= 1;
        }
        if matches!(e, Element::EndOfInput) {
            self.ended.store(true, Ordering::Relaxed);
        }
        let mut encoder = self.encoder.lock();
        self.conn
            .send(frame_with(DATA, self.channel, |f| encoder.encode(&e, f))?)?;
        Ok(None)
    }
}

impl Drop for RemoteSender {
    fn drop(&mut self) {
        if !self.ended.load(Ordering::Relaxed) {
            let _ = self.conn.send(frame(CLOSE, self.channel, &[]));
        }
        self.conn.channels.lock().remove(&self.channel);
    }
}

/// A channel named on the wire.
#[derive(serde::Serialize, serde::Deserialize)]
struct WireKey {
    job: String,
    attempt: u32,
    edge: u32,
    from: u32,
    to: u32,
    capacity: u32,
}

/// Returns credits for one channel of an incoming connection, half its capacity at a time.
#[derive(Debug)]
struct Grant {
    channel: u32,
    pending: AtomicU32,
    batch: u32,
    frames: Sender<Vec<u8>>,
}

impl CreditReturn for Grant {
    fn taken(&self) {
        let p = self.pending.fetch_add(1, Ordering::Relaxed) + 1;
        if p >= self.batch {
            let n = self.pending.swap(0, Ordering::Relaxed);
            if n > 0 {
                let _ = self
                    .frames
                    .send(frame(CREDIT, self.channel, &n.to_le_bytes()));
            }
        }
    }
}

/// Serves one incoming connection: opens channels, delivers their elements, closes them.
fn serve_incoming(stream: Duplex, shuffle: Arc<LocalShuffle>) -> io::Result<()> {
    let (tx, rx) = crossbeam_channel::unbounded();
    spawn_writer(
        stream.writer,
        stream.socket,
        rx,
        Arc::new(AtomicBool::new(false)),
        || {},
    )?;
    let mut r = BufReader::with_capacity(256 << 10, stream.reader);
    let mut open: HashMap<u32, (ChannelSender, Decoder)> = HashMap::new();
    while let Some(f) = read_frame(&mut r)? {
        let (kind, channel, payload) = (f.kind, f.channel, f.payload());
        match kind {
            OPEN => {
                let w: WireKey = postcard::from_bytes(payload)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let key = ChannelKey {
                    job: JobId(w.job),
                    attempt: w.attempt,
                    edge: w.edge as usize,
                    from: w.from,
                    to: w.to,
                };
                let capacity = w.capacity.max(1);
                let Some((sender, slot)) = shuffle.inbound(key.clone(), capacity as usize) else {
                    warn!(?key, "a channel was opened twice; ignoring the second open");
                    continue;
                };
                slot.attach(Arc::new(Grant {
                    channel,
                    pending: AtomicU32::new(0),
                    batch: capacity.div_ceil(2),
                    frames: tx.clone(),
                }));
                open.insert(channel, (sender, Decoder::default()));
                let _ = tx.send(frame(CREDIT, channel, &capacity.to_le_bytes()));
            }
            DATA => {
                let Some((sender, decoder)) = open.get_mut(&channel) else {
                    continue;
                };
                let e = decoder
                    .decode(f.bytes, 5)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                let end = matches!(e, Element::EndOfInput);
                // the sender spent a credit, so there is room; a consumer that already went
                // away (failed, cancelled) makes the element moot
                match sender.offer(e) {
                    Ok(None) => {}
                    Ok(Some(e)) => {
                        warn!(
                            channel,
                            "a sender exceeded its credit; blocking the connection"
                        );
                        let _ = sender.send(e);
                    }
                    Err(_) => {
                        open.remove(&channel);
                    }
                }
                if end {
                    open.remove(&channel);
                }
            }
            CLOSE => {
                open.remove(&channel);
            }
            k => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected frame kind {k} from a sender"),
                ));
            }
        }
    }
    Ok(())
}

const TAG_BATCH: u8 = 0;
const TAG_WATERMARK: u8 = 1;
const TAG_IDLE: u8 = 2;
const TAG_END: u8 = 3;
const TAG_BARRIER: u8 = 4;
const TAG_SUSPEND: u8 = 5;
/// A batch that starts a new Arrow IPC stream (its schema comes first).
const TAG_BATCH_NEW_STREAM: u8 = 6;
const TAG_JUDGE: u8 = 7;

/// The sending side of one channel's element encoding: the channel's Arrow IPC stream.
#[derive(Default)]
struct Encoder {
    stream: Option<(SchemaRef, StreamWriter<Vec<u8>>)>,
}

impl Encoder {
    /// Appends `e` to `out`: a tag byte, then a batch as the next message(s) of the channel's
    /// Arrow IPC stream (a new stream, schema first, when the schema changed), a watermark as
    /// eight bytes, a barrier with postcard.
    fn encode(&mut self, e: &Element, out: &mut Vec<u8>) -> freshet_engine::Result<()> {
        let err = |e: String| EngineError::Operator(format!("encoding an element: {e}"));
        match e {
            // an edge cuts rows out before they leave the process; a selection that got here
            // anyway travels as the batch of its rows
            Element::Rows(rows) => {
                return self.encode(&Element::Batch(rows.clone().into_batch()?), out);
            }
            Element::Batch(b) => {
                let same = self
                    .stream
                    .as_ref()
                    .is_some_and(|(s, _)| Arc::ptr_eq(s, &b.schema()) || **s == *b.schema());
                // the writer appends straight to the frame: it is swapped in and out
                let mut buf = std::mem::take(out);
                if same {
                    buf.push(TAG_BATCH);
                    let (_, w) = self.stream.as_mut().expect("checked");
                    std::mem::swap(w.get_mut(), &mut buf);
                } else {
                    buf.push(TAG_BATCH_NEW_STREAM);
                    let w =
                        StreamWriter::try_new(buf, &b.schema()).map_err(|e| err(e.to_string()))?;
                    self.stream = Some((b.schema(), w));
                }
                let (_, w) = self.stream.as_mut().expect("set");
                let written = w.write(b);
                *out = std::mem::take(w.get_mut());
                if let Err(e) = written {
                    // the stream's state is unknown now: the next batch starts a new one
                    self.stream = None;
                    return Err(err(e.to_string()));
                }
            }
            Element::Watermark(w) => {
                out.push(TAG_WATERMARK);
                out.extend_from_slice(&w.0.to_le_bytes());
            }
            Element::Judge(w) => {
                out.push(TAG_JUDGE);
                out.extend_from_slice(&w.0.to_le_bytes());
            }
            Element::Idle => out.push(TAG_IDLE),
            Element::EndOfInput => out.push(TAG_END),
            Element::Barrier(b) => {
                out.push(TAG_BARRIER);
                out.extend(postcard::to_stdvec(b).map_err(|e| err(e.to_string()))?);
            }
            Element::Suspend => out.push(TAG_SUSPEND),
        }
        Ok(())
    }
}

/// Reads `bytes` as the frames of an incoming data connection, decoding every `DATA` payload
/// as its channel's element; returns how many frames were read, or the first problem. The
/// receiver's decoding without sockets or channels: what the fuzz targets exercise.
pub fn decode_stream(mut bytes: &[u8]) -> io::Result<usize> {
    let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
    let mut decoders: HashMap<u32, Decoder> = HashMap::new();
    let mut frames = 0;
    while let Some(f) = read_frame(&mut bytes)? {
        frames += 1;
        match f.kind {
            OPEN => {
                postcard::from_bytes::<WireKey>(f.payload()).map_err(|e| invalid(e.to_string()))?;
                decoders.insert(f.channel, Decoder::default());
            }
            DATA => {
                if let Some(d) = decoders.get_mut(&f.channel) {
                    d.decode(f.bytes, 5).map_err(invalid)?;
                }
            }
            CREDIT | CLOSE => {}
            k => return Err(invalid(format!("unexpected frame kind {k}"))),
        }
    }
    Ok(frames)
}

/// Checks the framing of Arrow IPC stream messages, and that every buffer a batch names lies
/// inside its message's body at an 8-byte aligned offset, as the format requires (the IPC
/// reader panics on either).
fn check_ipc(mut b: &[u8]) -> Result<(), String> {
    use arrow::ipc::{MessageHeader, root_as_message};
    fn int(b: &[u8]) -> Result<i32, String> {
        b.get(..4)
            .map(|x| i32::from_le_bytes(x.try_into().expect("4 bytes")))
            .ok_or_else(|| "a truncated Arrow IPC message".to_string())
    }
    while !b.is_empty() {
        let mut len = int(b)?;
        b = &b[4..];
        if len == -1 {
            // the continuation marker, then the length
            len = int(b)?;
            b = &b[4..];
        }
        if len == 0 {
            return Ok(()); // end of stream
        }
        let len = usize::try_from(len).map_err(|_| "a negative Arrow IPC length")?;
        let meta = b.get(..len).ok_or("a truncated Arrow IPC message")?;
        b = &b[len..];
        let message =
            root_as_message(meta).map_err(|e| format!("a malformed Arrow IPC message: {e}"))?;
        let body = usize::try_from(message.bodyLength())
            .ok()
            .filter(|n| *n <= b.len())
            .ok_or("an Arrow IPC body longer than its frame")?;
        let batch = match message.header_type() {
            MessageHeader::RecordBatch => message.header_as_record_batch(),
            MessageHeader::DictionaryBatch => {
                message.header_as_dictionary_batch().and_then(|d| d.data())
            }
            _ => None,
        };
        for buffer in batch.and_then(|r| r.buffers()).into_iter().flatten() {
            let end = buffer.offset().checked_add(buffer.length());
            let inside = buffer.offset() >= 0
                && buffer.length() >= 0
                && end.is_some_and(|e| e as u64 <= body as u64);
            if !inside {
                return Err("an Arrow IPC buffer outside its message's body".into());
            }
            if buffer.offset() % 8 != 0 {
                return Err("an Arrow IPC buffer not aligned to 8 bytes".into());
            }
        }
        b = &b[body..];
    }
    Ok(())
}

/// The receiving side of one channel's element encoding: the channel's Arrow IPC stream.
#[derive(Default)]
struct Decoder {
    stream: StreamDecoder,
}

impl Decoder {
    /// Decodes the element in `bytes[start..]`. The bytes are taken so a batch's buffers can
    /// point into them without a copy.
    fn decode(&mut self, bytes: Vec<u8>, start: usize) -> Result<Element, String> {
        let (tag, rest) = bytes
            .get(start..)
            .and_then(|b| b.split_first())
            .ok_or("empty element")?;
        Ok(match *tag {
            TAG_BATCH | TAG_BATCH_NEW_STREAM => {
                if *tag == TAG_BATCH_NEW_STREAM {
                    self.stream = StreamDecoder::new();
                } else if self.stream.schema().is_none() {
                    return Err("a batch before its stream's schema".into());
                }
                check_ipc(rest)?;
                let mut buf = Buffer::from_vec(bytes);
                buf.advance(start + 1);
                let stream = &mut self.stream;
                // the IPC reader panics on some malformed messages (a buffer offset past the
                // body) instead of returning an error: such a message fails the connection
                // like any other malformed one, not the process
                let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let mut batch: Option<RecordBatch> = None;
                    while !buf.is_empty() {
                        if let Some(b) = stream.decode(&mut buf).map_err(|e| e.to_string())?
                            && batch.replace(b).is_some()
                        {
                            return Err("two batches in one element".to_string());
                        }
                    }
                    batch.ok_or_else(|| "a batch element without a batch".to_string())
                }));
                match decoded {
                    Ok(batch) => Element::Batch(batch?),
                    Err(_) => {
                        self.stream = StreamDecoder::new();
                        return Err("a malformed Arrow IPC message".into());
                    }
                }
            }
            TAG_WATERMARK => Element::Watermark(Watermark(i64::from_le_bytes(
                rest.try_into().map_err(|_| "bad watermark")?,
            ))),
            TAG_JUDGE => Element::Judge(Watermark(i64::from_le_bytes(
                rest.try_into().map_err(|_| "bad judge watermark")?,
            ))),
            TAG_IDLE => Element::Idle,
            TAG_END => Element::EndOfInput,
            TAG_BARRIER => Element::Barrier(postcard::from_bytes(rest).map_err(|e| e.to_string())?),
            TAG_SUSPEND => Element::Suspend,
            t => return Err(format!("unknown element tag {t}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;
    use freshet_engine::channel::CancelToken;
    use freshet_engine::checkpoint::{Barrier, SnapshotKind};
    use freshet_engine::metrics::SubtaskMetrics;

    fn key(to: u32) -> ChannelKey {
        ChannelKey {
            job: JobId("j".into()),
            attempt: 0,
            edge: 0,
            from: 0,
            to,
        }
    }

    fn batch(n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("__time", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![format!("k{n}")])),
                Arc::new(Int64Array::from(vec![n])),
            ],
        )
        .unwrap()
    }

    /// Encodes `e` as the next element of a channel, and decodes it at the other end.
    fn round_trip(enc: &mut Encoder, dec: &mut Decoder, e: &Element) -> (Element, usize) {
        let mut bytes = vec![0u8; 5];
        enc.encode(e, &mut bytes).unwrap();
        let len = bytes.len();
        (dec.decode(bytes, 5).unwrap(), len)
    }

    #[test]
    fn elements_survive_the_wire() {
        let (mut enc, mut dec) = (Encoder::default(), Decoder::default());
        for e in [
            Element::Batch(batch(7)),
            Element::Watermark(Watermark(-3)),
            Element::Judge(Watermark(42)),
            Element::Batch(batch(8)),
            Element::Idle,
            Element::EndOfInput,
            Element::Suspend,
            Element::Barrier(Barrier {
                id: 4,
                kind: SnapshotKind::Savepoint,
                target: Some("s3://b/x".into()),
                stop: true,
                trace: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            }),
        ] {
            let (back, _) = round_trip(&mut enc, &mut dec, &e);
            assert_eq!(format!("{e:?}"), format!("{back:?}"));
        }
        assert!(dec.decode(vec![9], 0).is_err());
        assert!(dec.decode(vec![], 0).is_err());
    }

    /// What a sender writes on a connection, as whole frames.
    fn sender_bytes() -> Vec<u8> {
        let wire = WireKey {
            job: "j".into(),
            attempt: 1,
            edge: 0,
            from: 0,
            to: 1,
            capacity: 4,
        };
        let mut out = frame(OPEN, 0, &postcard::to_stdvec(&wire).unwrap());
        let mut enc = Encoder::default();
        for e in [
            Element::Batch(batch(1)),
            Element::Batch(batch(2)),
            Element::Watermark(Watermark(5)),
            Element::Barrier(Barrier {
                id: 2,
                kind: SnapshotKind::Checkpoint,
                target: None,
                stop: false,
                trace: None,
            }),
            Element::EndOfInput,
        ] {
            out.extend(frame_with(DATA, 0, |f| enc.encode(&e, f)).unwrap());
        }
        out.extend(frame(CLOSE, 0, &[]));
        out
    }

    /// The receiver's decoding without sockets reads what a sender writes, refuses a length
    /// field promising more than arrives, and the bytes are a seed of the fuzz corpus
    /// (`FRESHET_WRITE_FUZZ_SEEDS=1` writes it).
    #[test]
    fn a_sender_stream_decodes_and_a_truncated_one_is_refused() {
        let bytes = sender_bytes();
        assert_eq!(decode_stream(&bytes).unwrap(), 7);
        assert!(decode_stream(&bytes[..bytes.len() - 3]).is_err());
        let mut huge = bytes.clone();
        huge.extend_from_slice(&(MAX_FRAME as u32).to_le_bytes());
        huge.push(DATA);
        assert!(decode_stream(&huge).is_err());
        if std::env::var_os("FRESHET_WRITE_FUZZ_SEEDS").is_some() {
            let dir =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/data_frames");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("sender.bin"), &bytes).unwrap();
        }
    }

    #[test]
    fn a_channel_sends_its_schema_once_and_again_when_it_changes() {
        let (mut enc, mut dec) = (Encoder::default(), Decoder::default());
        let (_, first) = round_trip(&mut enc, &mut dec, &Element::Batch(batch(1)));
        let (back, next) = round_trip(&mut enc, &mut dec, &Element::Batch(batch(2)));
        assert!(
            next < first,
            "the second batch repeated the schema ({next} vs {first} bytes)"
        );
        assert_eq!(
            format!("{back:?}"),
            format!("{:?}", Element::Batch(batch(2)))
        );
        // another schema on the same channel starts a new stream
        let other = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, true)])),
            vec![Arc::new(Int64Array::from(vec![Some(5), None]))],
        )
        .unwrap();
        let (back, _) = round_trip(&mut enc, &mut dec, &Element::Batch(other.clone()));
        assert_eq!(format!("{back:?}"), format!("{:?}", Element::Batch(other)));
        let (back, _) = round_trip(&mut enc, &mut dec, &Element::Batch(batch(3)));
        assert_eq!(
            format!("{back:?}"),
            format!("{:?}", Element::Batch(batch(3)))
        );
        // a receiver that missed the stream's start refuses its batches
        let mut late = Decoder::default();
        let mut bytes = vec![0u8; 5];
        enc.encode(&Element::Batch(batch(4)), &mut bytes).unwrap();
        assert!(late.decode(bytes, 5).is_err());
    }

    /// TLS material of a new cluster CA, in `dir`.
    fn tls(dir: &std::path::Path) -> Arc<Tls> {
        let files = freshet_security::certs::generate(&[], 1)
            .unwrap()
            .write(dir)
            .unwrap();
        Tls::from_files(files).unwrap()
    }

    #[test]
    fn a_remote_channel_keeps_order_and_sends_only_with_credit() {
        keeps_order_and_credit(None);
    }

    #[test]
    fn a_remote_channel_over_mutual_tls_keeps_order_and_sends_only_with_credit() {
        let dir = tempfile::tempdir().unwrap();
        keeps_order_and_credit(Some(tls(dir.path())));
    }

    #[test]
    fn a_peer_of_another_cluster_ca_cannot_open_a_channel() {
        let dir = tempfile::tempdir().unwrap();
        let a = Network::start(
            "127.0.0.1:0",
            Arc::new(LocalShuffle::new()),
            Some(tls(&dir.path().join("a"))),
        )
        .unwrap();
        let b_shuffle = Arc::new(LocalShuffle::new());
        let b = Network::start(
            "127.0.0.1:0",
            b_shuffle.clone(),
            Some(tls(&dir.path().join("b"))),
        )
        .unwrap();
        let plain = Network::start("127.0.0.1:0", Arc::new(LocalShuffle::new()), None).unwrap();
        let err = a
            .sender(&b.address().to_string(), key(1), 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("TLS handshake"), "{err}");
        // a peer without TLS gets its connection closed: nothing reaches the receiver
        let tx = plain.sender(&b.address().to_string(), key(2), 2).unwrap();
        std::thread::spawn(move || tx.send(Element::Idle));
        let rx = b_shuffle.receiver(key(2), 2);
        assert!(!matches!(
            rx.recv_timeout(Duration::from_millis(500)),
            Ok(Some(_))
        ));
    }

    fn keeps_order_and_credit(tls: Option<Arc<Tls>>) {
        let a = Network::start("127.0.0.1:0", Arc::new(LocalShuffle::new()), tls.clone()).unwrap();
        let b_shuffle = Arc::new(LocalShuffle::new());
        let b = Network::start("127.0.0.1:0", b_shuffle.clone(), tls).unwrap();
        let capacity = 4;
        let mut tx = a
            .sender(&b.address().to_string(), key(1), capacity)
            .unwrap();
        let metrics = Arc::new(SubtaskMetrics::default());
        tx.bind(CancelToken::new(), metrics.clone());
        let rx = b_shuffle.receiver(key(1), capacity);
        let producer = std::thread::spawn(move || {
            for i in 0..20 {
                tx.send(Element::Batch(batch(i))).unwrap();
                tx.send(Element::Watermark(Watermark(i))).unwrap();
            }
            tx.send(Element::EndOfInput).unwrap();
        });
        // nothing is read for a while: the producer stops after `capacity` elements
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(rx.len(), capacity, "the sender ran past its credit");
        let mut got = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(5)).unwrap() {
                Some(Element::EndOfInput) => break,
                Some(Element::Batch(b)) => got.push(
                    b.column(1)
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .unwrap()
                        .value(0),
                ),
                Some(Element::Watermark(w)) => assert_eq!(Some(&w.0), got.last()),
                other => panic!("unexpected {other:?}"),
            }
        }
        producer.join().unwrap();
        assert_eq!(got, (0..20).collect::<Vec<_>>());
        // the wait for credit counts as backpressure
        assert!(metrics.snapshot().backpressured_ns > 200_000_000);
    }

    #[test]
    fn an_unreachable_peer_does_not_hold_up_channels_to_others() {
        let a = Network::start("127.0.0.1:0", Arc::new(LocalShuffle::new()), None).unwrap();
        let b_shuffle = Arc::new(LocalShuffle::new());
        let b = Network::start("127.0.0.1:0", b_shuffle.clone(), None).unwrap();
        // a port nobody listens on: connecting retries for a while
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let a2 = a.clone();
        std::thread::spawn(move || a2.sender(&dead, key(5), 2));
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        let tx = a.sender(&b.address().to_string(), key(6), 2).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "waited {:?} behind the unreachable peer",
            started.elapsed()
        );
        let rx = b_shuffle.receiver(key(6), 2);
        tx.send(Element::Idle).unwrap();
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(5)),
            Ok(Some(Element::Idle))
        ));
    }

    #[test]
    fn a_sender_that_goes_away_closes_the_channel() {
        let a = Network::start("127.0.0.1:0", Arc::new(LocalShuffle::new()), None).unwrap();
        let b_shuffle = Arc::new(LocalShuffle::new());
        let b = Network::start("127.0.0.1:0", b_shuffle.clone(), None).unwrap();
        let tx = a.sender(&b.address().to_string(), key(2), 2).unwrap();
        let rx = b_shuffle.receiver(key(2), 2);
        tx.send(Element::Idle).unwrap();
        drop(tx);
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(5)),
            Ok(Some(Element::Idle))
        ));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Err(EngineError::UpstreamClosed) => break,
                Ok(None) if Instant::now() < deadline => continue,
                other => panic!("expected the channel to close, got {other:?}"),
            }
        }
    }
}
