//! kt patch: the window-adjust scenario of `test_window_adjust.rs` with
//! `window_on_consumption: true`. The receiving end grants window only as its application
//! reports consumption (`ChannelWriteHalf::consumed`), so a sender that never stops writing
//! is held back at one window until the data it sent has been consumed, and then gets a
//! whole window again. Covered in both directions: client to server (the server's session
//! grants) and server to client (the client's session grants).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::server::{self, Auth, Msg, Server as _, Session, VerifiedPublicKey};
use russh::{Channel, ChannelMsg, ChannelReadHalf, Disconnect, client};
use ssh_key::PrivateKey;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, timeout};

/// The receiving end's window, in bytes.
const WINDOW: u32 = 64 * 1024;

/// How long the sender is given to show it is held back (it would overrun the window within
/// milliseconds on loopback if window were granted on arrival).
const HOLD: Duration = Duration::from_millis(300);

/// How long a granted window may take to be used.
const PROGRESS: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_uploading_client_is_held_back_until_the_server_consumes() -> Result<(), anyhow::Error> {
    let _ = env_logger::try_init();

    let (addr, mut server_channels) = start_server(true).await?;
    let session = connect(addr, false).await?;
    let client_channel = session.channel_open_session().await?;
    let server_channel = timeout(PROGRESS, server_channels.recv())
        .await?
        .expect("the server accepts the channel");

    let uploading = spawn_writer(client_channel.make_writer());
    let (read_half, write_half) = server_channel.split();
    let received = spawn_counter(read_half);

    held_back_until_consumed(received, |bytes| write_half.consumed(bytes)).await?;

    uploading.abort();
    session
        .disconnect(Disconnect::ByApplication, "", "")
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_downloading_server_is_held_back_until_the_client_consumes() -> Result<(), anyhow::Error>
{
    let _ = env_logger::try_init();

    let (addr, mut server_channels) = start_server(false).await?;
    let session = connect(addr, true).await?;
    let client_channel = session.channel_open_session().await?;
    let server_channel = timeout(PROGRESS, server_channels.recv())
        .await?
        .expect("the server accepts the channel");

    let downloading = spawn_writer(server_channel.make_writer());
    let (read_half, write_half) = client_channel.split();
    let received = spawn_counter(read_half);

    held_back_until_consumed(received, |bytes| write_half.consumed(bytes)).await?;

    downloading.abort();
    session
        .disconnect(Disconnect::ByApplication, "", "")
        .await?;
    Ok(())
}

/// The sender writes without pause; `received` counts what reaches the receiving
/// application and `consume` reports consumption to the receiving session.
async fn held_back_until_consumed(
    mut received: watch::Receiver<usize>,
    consume: impl Fn(u32) -> Result<(), russh::Error>,
) -> Result<(), anyhow::Error> {
    let window = WINDOW as usize;

    // Nothing consumed: the sender fills exactly one window and stops there.
    timeout(PROGRESS, received.wait_for(|bytes| *bytes >= window)).await??;
    sleep(HOLD).await;
    assert_eq!(
        *received.borrow(),
        window,
        "the sender went past its window although nothing was consumed"
    );

    // Less than a quarter window consumed: not worth a grant yet.
    consume(WINDOW / 8)?;
    sleep(HOLD).await;
    assert_eq!(
        *received.borrow(),
        window,
        "an eighth of a window consumed was granted on its own"
    );

    // The rest consumed: a whole window is granted, used, and the sender is held again.
    consume(WINDOW - WINDOW / 8)?;
    timeout(PROGRESS, received.wait_for(|bytes| *bytes >= 2 * window)).await??;
    sleep(HOLD).await;
    assert_eq!(
        *received.borrow(),
        2 * window,
        "the sender went past the window granted for the consumed data"
    );
    Ok(())
}

/// Writes zeros to the channel until the write fails.
fn spawn_writer(
    mut writer: impl tokio::io::AsyncWrite + Unpin + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let chunk = vec![0u8; 16 * 1024];
        while writer.write_all(&chunk).await.is_ok() {}
    })
}

/// Takes every message off the channel as it arrives (so the session loop never waits on
/// it) and publishes the running total of data bytes, consuming none of them.
fn spawn_counter(mut read_half: ChannelReadHalf) -> watch::Receiver<usize> {
    let (total_tx, total_rx) = watch::channel(0);
    tokio::spawn(async move {
        while let Some(msg) = read_half.wait().await {
            if let ChannelMsg::Data { data } = msg {
                total_tx.send_modify(|total| *total += data.len());
            }
        }
    });
    total_rx
}

async fn start_server(
    window_on_consumption: bool,
) -> Result<(SocketAddr, mpsc::UnboundedReceiver<Channel<Msg>>), anyhow::Error> {
    let config = Arc::new(server::Config {
        keys: vec![PrivateKey::random(&mut rand::rng(), ssh_key::Algorithm::Ed25519).unwrap()],
        window_size: WINDOW,
        window_on_consumption,
        ..Default::default()
    });
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let (channels_tx, channels_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        Server {
            channels: channels_tx,
        }
        .run_on_socket(config, &listener)
        .await
    });
    Ok((addr, channels_rx))
}

async fn connect(
    addr: SocketAddr,
    window_on_consumption: bool,
) -> Result<client::Handle<Client>, anyhow::Error> {
    let config = Arc::new(client::Config {
        window_size: WINDOW,
        window_on_consumption,
        ..Default::default()
    });
    let mut session = client::connect(config, addr, Client).await?;
    let key = Arc::new(PrivateKey::random(&mut rand::rng(), ssh_key::Algorithm::Ed25519).unwrap());
    let auth = session
        .authenticate_publickey("user", PrivateKeyWithHashAlg::new(key, None))
        .await?;
    assert!(auth.success(), "authentication failed");
    Ok(session)
}

/// Hands every accepted session channel to the test.
#[derive(Clone)]
struct Server {
    channels: mpsc::UnboundedSender<Channel<Msg>>,
}

impl server::Server for Server {
    type Handler = Self;

    fn new_client(&mut self, _: Option<SocketAddr>) -> Self::Handler {
        self.clone()
    }
}

impl server::Handler for Server {
    type Error = anyhow::Error;

    async fn auth_publickey(
        &mut self,
        _: &str,
        _: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        let _ = self.channels.send(channel);
        Ok(())
    }
}

struct Client;

impl client::Handler for Client {
    type Error = anyhow::Error;

    async fn check_server_key(&mut self, _: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }
}
