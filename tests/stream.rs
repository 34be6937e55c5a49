use std::sync::Arc;

use capnp_noise::stream::{self, StreamConfig};
use capnp_noise::{AnyVat, Identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn basic_tcp() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let a = Identity::generate();
    let b = Identity::generate();
    let srv = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let mut s = stream::accept(tcp, &b, Arc::new(AnyVat), StreamConfig::default())
            .await
            .unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(&buf).await.unwrap();
        s.flush().await.unwrap();
        buf
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut c = stream::connect(tcp, &a, Arc::new(AnyVat), StreamConfig::default())
        .await
        .unwrap();
    c.write_all(b"hello").await.unwrap();
    c.flush().await.unwrap();
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    srv.await.unwrap();
}
