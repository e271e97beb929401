//! A publisher that writes AMQP 0-9-1 frames by hand, for messages no
//! client library will build: a `message_id` that is not UTF-8, a header
//! table nested thousands deep. RabbitMQ accepts both and passes them on.

use std::io::{Read, Write};
use std::net::TcpStream;

/// The parts of a message's content header this publisher can set.
pub struct RawMessage<'a> {
    /// `message_id` as raw bytes (at most 255).
    pub message_id: Option<&'a [u8]>,
    /// `headers` as an encoded field table (its bytes after the length).
    pub headers: Option<Vec<u8>>,
    pub body: &'a [u8],
}

/// Publishes `message` to `queue` through the default exchange on the
/// broker at `url` (its host, port and login), then closes the channel (the
/// broker has routed the message once it answers).
pub fn publish(url: &str, queue: &str, message: &RawMessage<'_>) {
    let url = url::Url::parse(url).unwrap();
    let addr = (url.host_str().unwrap(), url.port().unwrap_or(5672));
    let login = format!("\0{}\0{}", url.username(), url.password().unwrap_or(""));
    let mut socket = TcpStream::connect(addr).expect("the broker listens");
    socket.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
    read_frame(&mut socket); // connection.start
    let mut start_ok = method(10, 11);
    start_ok.extend(0u32.to_be_bytes()); // client properties: an empty table
    short_string(&mut start_ok, b"PLAIN");
    long_string(&mut start_ok, login.as_bytes());
    short_string(&mut start_ok, b"en_US");
    write_frame(&mut socket, 1, 0, &start_ok);
    read_frame(&mut socket); // connection.tune
    let mut tune_ok = method(10, 31);
    tune_ok.extend(2047u16.to_be_bytes());
    tune_ok.extend(131_072u32.to_be_bytes());
    tune_ok.extend(0u16.to_be_bytes());
    write_frame(&mut socket, 1, 0, &tune_ok);
    let mut open = method(10, 40);
    short_string(&mut open, b"/");
    short_string(&mut open, b"");
    open.push(0);
    write_frame(&mut socket, 1, 0, &open);
    read_frame(&mut socket); // connection.open-ok
    let mut channel_open = method(20, 10);
    short_string(&mut channel_open, b"");
    write_frame(&mut socket, 1, 1, &channel_open);
    read_frame(&mut socket); // channel.open-ok

    let mut publish = method(60, 40);
    publish.extend(0u16.to_be_bytes());
    short_string(&mut publish, b"");
    short_string(&mut publish, queue.as_bytes());
    publish.push(0);
    write_frame(&mut socket, 1, 1, &publish);
    write_frame(&mut socket, 2, 1, &content_header(message));
    write_frame(&mut socket, 3, 1, message.body);

    let mut close = method(20, 40);
    close.extend(200u16.to_be_bytes());
    short_string(&mut close, b"");
    close.extend([0, 0, 0, 0]);
    write_frame(&mut socket, 1, 1, &close);
    let (kind, payload) = read_frame(&mut socket);
    assert_eq!(
        (kind, &payload[..4]),
        (1, &[0, 20, 0, 41][..]),
        "channel.close-ok"
    );
}

/// A header table nested `depth` levels deep, as the bytes after its length.
pub fn nested_table(depth: usize) -> Vec<u8> {
    let mut inner: Vec<u8> = Vec::new();
    for _ in 0..depth {
        let mut table = Vec::with_capacity(inner.len() + 7);
        short_string(&mut table, b"d");
        table.push(b'F');
        table.extend((inner.len() as u32).to_be_bytes());
        table.extend(&inner);
        inner = table;
    }
    inner
}

fn content_header(message: &RawMessage<'_>) -> Vec<u8> {
    let mut flags = 0x8000 | 0x1000; // content-type, delivery-mode
    let mut properties = Vec::new();
    short_string(&mut properties, b"application/json");
    if let Some(headers) = &message.headers {
        flags |= 0x2000;
        properties.extend((headers.len() as u32).to_be_bytes());
        properties.extend(headers);
    }
    properties.push(2); // persistent
    if let Some(id) = message.message_id {
        flags |= 0x0080;
        short_string(&mut properties, id);
    }
    let mut header = Vec::new();
    header.extend(60u16.to_be_bytes());
    header.extend(0u16.to_be_bytes());
    header.extend((message.body.len() as u64).to_be_bytes());
    header.extend((flags as u16).to_be_bytes());
    header.extend(properties);
    header
}

fn method(class: u16, method: u16) -> Vec<u8> {
    let mut payload = class.to_be_bytes().to_vec();
    payload.extend(method.to_be_bytes());
    payload
}

fn short_string(out: &mut Vec<u8>, value: &[u8]) {
    out.push(u8::try_from(value.len()).expect("a short string"));
    out.extend(value);
}

fn long_string(out: &mut Vec<u8>, value: &[u8]) {
    out.extend((value.len() as u32).to_be_bytes());
    out.extend(value);
}

fn write_frame(socket: &mut TcpStream, kind: u8, channel: u16, payload: &[u8]) {
    let mut frame = vec![kind];
    frame.extend(channel.to_be_bytes());
    frame.extend((payload.len() as u32).to_be_bytes());
    frame.extend(payload);
    frame.push(0xCE);
    socket.write_all(&frame).unwrap();
}

fn read_frame(socket: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 7];
    socket.read_exact(&mut head).unwrap();
    let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
    let mut payload = vec![0u8; size + 1];
    socket.read_exact(&mut payload).unwrap();
    payload.pop();
    (head[0], payload)
}
