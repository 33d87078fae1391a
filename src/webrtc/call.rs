//! One browser call: the peer connection hark answers with, and the task that runs it
//! — session events over the data channel, microphone audio into the session, hark's
//! audio track out — until the peer goes away.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ::webrtc::data_channel::DataChannel;
use ::webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use ::webrtc::media_stream::track_local::TrackLocal;
use ::webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use ::webrtc::peer_connection::{
    register_default_interceptors, MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceGatheringState, RTCIceServer, RTCPeerConnectionState, Registry, SettingEngineBuilder,
};
use ::webrtc::rtp_transceiver::RtpSender;
use rtc::media::Sample;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_H264, MIME_TYPE_OPUS, MIME_TYPE_VP8};
use rtc::peer_connection::configuration::setting_engine::SctpMaxMessageSize;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::audio::{self, OpusInput, OutgoingAudio, OPUS_RATE};
use super::signaling::Offer;
use super::{CallContext, CallError};
use crate::protocol::{parse_client_event, to_wire, ServerEvent};
use crate::session::{Session, SessionInput};

/// Events not yet sendable (the data channel is not open) are held up to this many;
/// past it the call is not working and is ended.
const MAX_BACKLOG: usize = 4096;
/// Bytes queued on the data channel before sending waits for the peer.
const DATA_CHANNEL_SEND_LIMIT: usize = 16 * 1024 * 1024;
/// How long ICE gathering may take before the answer is sent with what it has.
const GATHER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the peer connection reports, forwarded from its driver to the call task.
enum PeerEvent {
    State(RTCPeerConnectionState),
    GatheringComplete,
    DataChannel(Arc<dyn DataChannel>),
    Track(Arc<dyn TrackRemote>),
    EventsClosed,
    /// The client sent `output_audio_buffer.clear`.
    ClearAudio,
}

/// The driver calls these on its own task: they only forward, never block.
struct Handler {
    tx: mpsc::UnboundedSender<PeerEvent>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.tx.send(PeerEvent::GatheringComplete);
        }
    }
    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.tx.send(PeerEvent::State(state));
    }
    async fn on_data_channel(&self, dc: Arc<dyn DataChannel>) {
        let _ = self.tx.send(PeerEvent::DataChannel(dc));
    }
    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let _ = self.tx.send(PeerEvent::Track(track));
    }
}

fn opus_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: OPUS_RATE,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
        rtcp_feedback: vec![],
    }
}

/// Only what hark decodes is negotiated: Opus, and VP8 or H.264 for the camera.
fn media_engine() -> Result<MediaEngine, CallError> {
    let mut m = MediaEngine::default();
    m.register_codec(RTCRtpCodecParameters { rtp_codec: opus_codec(), payload_type: 111 }, RtpCodecKind::Audio)?;
    let feedback = vec![
        RTCPFeedback { typ: "nack".to_owned(), parameter: "".to_owned() },
        RTCPFeedback { typ: "nack".to_owned(), parameter: "pli".to_owned() },
        RTCPFeedback { typ: "ccm".to_owned(), parameter: "fir".to_owned() },
    ];
    let vp8 = RTCRtpCodec { mime_type: MIME_TYPE_VP8.to_owned(), clock_rate: 90_000, channels: 0, sdp_fmtp_line: String::new(), rtcp_feedback: feedback };
    m.register_codec(RTCRtpCodecParameters { rtp_codec: vp8.clone(), payload_type: 96 }, RtpCodecKind::Video)?;
    // H.264 constrained baseline (42e01f) and baseline (42001f), as browsers offer them,
    // in both packetization modes (`h264.rs` takes single NAL units, STAP-A and FU-A).
    // VP8 is registered first: when a browser offers both, the answer keeps the
    // browser's order, and Chromium lists VP8 first.
    let h264 = [(102, "42001f", 1), (127, "42001f", 0), (125, "42e01f", 1), (108, "42e01f", 0)];
    for (payload_type, profile, mode) in h264 {
        let codec = RTCRtpCodec {
            mime_type: MIME_TYPE_H264.to_owned(),
            sdp_fmtp_line: format!("level-asymmetry-allowed=1;packetization-mode={mode};profile-level-id={profile}"),
            ..vp8.clone()
        };
        m.register_codec(RTCRtpCodecParameters { rtp_codec: codec, payload_type }, RtpCodecKind::Video)?;
    }
    Ok(m)
}

/// A call that has been answered; its task runs in the background.
pub struct Answered {
    pub call_id: String,
    pub sdp: String,
}

/// Builds the peer connection for `offer`, answers it (ICE candidates gathered, no
/// trickle: the OpenAI flow has one request and one response), and starts the call.
pub async fn answer(ctx: CallContext, offer: Offer) -> Result<Answered, CallError> {
    let mut media = media_engine()?;
    let registry = register_default_interceptors(Registry::new(), &mut media)?;
    let ice_servers = ctx
        .webrtc
        .ice_servers
        .iter()
        .map(|s| RTCIceServer { urls: s.urls.clone(), username: s.username.clone(), credential: s.credential.clone() })
        .collect();
    let config = RTCConfigurationBuilder::new().with_ice_servers(ice_servers).build();
    // Browsers on the same machine reach hark over loopback; RFC 8445 skips it by default.
    // A peer that vanishes without closing (killed tab, lost network) is noticed by
    // ICE consent checks: "disconnected" after a few missed keepalives, "failed" (the
    // call ends) after `ice_failed_timeout_ms`.
    let failed = Duration::from_millis(ctx.webrtc.ice_failed_timeout_ms);
    let disconnected = (failed / 3).min(Duration::from_secs(5));
    // SCTP's default limit is 64 KiB per message (RFC 8841); a client image sent as
    // conversation.item.create is larger. Browsers cap their side themselves (Chromium
    // 256 KiB), so hark accepts up to its own WebSocket limit.
    let max_message = u32::try_from(ctx.max_message_bytes).unwrap_or(u32::MAX);
    let settings = SettingEngineBuilder::new()
        .with_sctp_max_message_size(SctpMaxMessageSize::Bounded(max_message))
        .with_include_loopback_candidate(true)
        // (ICE counts "failed" from "disconnected", as pion does.)
        .with_ice_timeouts(Some(disconnected), Some(failed.saturating_sub(disconnected)), Some(Duration::from_secs(2)))
        .build();
    let (tx, mut events) = mpsc::unbounded_channel();
    let pc = PeerConnectionBuilder::new()
        .with_configuration(config)
        .with_media_engine(media)
        .with_setting_engine(settings)
        .with_interceptor_registry(registry)
        .with_handler(Arc::new(Handler { tx: tx.clone() }))
        .with_udp_addrs(ctx.udp_addrs.clone())
        // Bounded, so a peer that stops reading makes `send_text` wait, and the call
        // is cut off after `client_read_timeout_ms` instead of queueing without end
        // (Chromium's own cap; far above SCTP's receive window).
        .with_data_channel_send_buffer_limit(DATA_CHANNEL_SEND_LIMIT)
        .build()
        .await
        .map_err(|e| CallError::Internal(format!("cannot open the call's sockets: {e}")))?;
    let pc: Arc<dyn PeerConnection> = Arc::new(pc);

    let setup = async {
        let ssrc = fastrand::u32(..);
        let track = Arc::new(TrackLocalStaticSample::new(
            std::time::Instant::now(),
            MediaStreamTrack::new(
                "hark".to_owned(),
                "hark-audio".to_owned(),
                "hark".to_owned(),
                RtpCodecKind::Audio,
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters { ssrc: Some(ssrc), ..Default::default() },
                    codec: opus_codec(),
                    ..Default::default()
                }],
            ),
        )?);
        let sender = pc.add_track(Arc::clone(&track) as Arc<dyn TrackLocal>).await?;
        pc.set_remote_description(offer.description).await.map_err(|e| CallError::Offer(e.to_string()))?;
        let answer = pc.create_answer(None).await.map_err(|e| CallError::Offer(e.to_string()))?;
        pc.set_local_description(answer).await?;
        Ok::<_, CallError>((track, sender, ssrc))
    };
    let (track, sender, ssrc) = match setup.await {
        Ok(t) => t,
        Err(e) => {
            let _ = pc.close().await;
            return Err(e);
        }
    };
    // Wait for host candidates (milliseconds; STUN/TURN take longer), keeping other
    // events for the call task.
    let mut early = Vec::new();
    let gathered = tokio::time::timeout(GATHER_TIMEOUT, async {
        while let Some(ev) = events.recv().await {
            match ev {
                PeerEvent::GatheringComplete => return,
                other => early.push(other),
            }
        }
    })
    .await;
    if gathered.is_err() {
        tracing::warn!("ICE gathering did not finish within {GATHER_TIMEOUT:?}; answering with the candidates found so far");
    }
    let Some(local) = pc.local_description().await else {
        let _ = pc.close().await;
        return Err(CallError::Internal("the peer connection has no local description".into()));
    };
    let call_id = crate::protocol::new_id("rtc");
    let (audio_out, outgoing) = audio::outgoing()?;
    ctx.calls.register(&call_id, audio_out);
    let task = CallTask { ctx, pc, call_id: call_id.clone(), tx, track, sender, ssrc, video: offer.video, outgoing: Some(outgoing) };
    let tracker = task.ctx.tracker.clone();
    tracker.spawn(task.run(events, early));
    Ok(Answered { call_id, sdp: local.sdp })
}

struct CallTask {
    ctx: CallContext,
    pc: Arc<dyn PeerConnection>,
    call_id: String,
    tx: mpsc::UnboundedSender<PeerEvent>,
    track: Arc<TrackLocalStaticSample>,
    sender: Arc<dyn RtpSender>,
    ssrc: u32,
    video: bool,
    outgoing: Option<OutgoingAudio>,
}

impl CallTask {
    async fn run(mut self, mut events: mpsc::UnboundedReceiver<PeerEvent>, early: Vec<PeerEvent>) {
        let call_id = self.call_id.clone();
        let mut outgoing = self.outgoing.take();
        let ctx = &self.ctx;
        let hangup = ctx.calls.hangup_token(&call_id);
        tracing::info!(call = %call_id, video = self.video, "webrtc call answered");
        let (in_tx, in_rx) = mpsc::channel::<SessionInput>(256);
        let (out_tx, mut out_rx) = mpsc::channel::<ServerEvent>(1024);
        // Playback reports (output_audio_buffer.*) join the session's events, so they go
        // out in order with them; weak, so the session ending still ends the stream.
        let playback_tx = out_tx.downgrade();
        // A response whose audio was cut off: its later deltas are not played.
        let mut cleared_response: Option<String> = None;
        // The response whose audio went on the track last.
        let mut audio_response: Option<String> = None;
        let session_end = ctx.shutdown.child_token();
        let session = Session::new(ctx.deps.clone(), ctx.model.clone());
        let session_task = tokio::spawn(session.run(in_rx, out_tx, session_end.clone()));
        if let Some(config) = ctx.session_config.clone() {
            // The configuration the ephemeral key or the request carried is the call's
            // first session.update, answered like any other.
            let input = match parse_client_event(&serde_json::json!({"type": "session.update", "session": config}).to_string()) {
                Ok(env) => SessionInput::Client(env),
                Err(e) => SessionInput::Invalid(e),
            };
            let _ = in_tx.send(input).await;
        }
        // Everything this call spawns stops with it.
        let done = CancellationToken::new();
        let _stop_children = done.clone().drop_guard();
        let mut observer = crate::metrics::EventObserver::new(&ctx.metrics);
        let mut channel: Option<Arc<dyn DataChannel>> = None;
        let mut backlog: VecDeque<String> = VecDeque::new();
        let connect_deadline = tokio::time::sleep(Duration::from_millis(ctx.webrtc.connect_timeout_ms));
        tokio::pin!(connect_deadline);
        let mut connected = false;
        let started = std::time::Instant::now();
        let video = ctx.calls.video_state(&call_id);
        let mut pending_early = early.into_iter();
        let why = loop {
            let ev = if let Some(ev) = pending_early.next() {
                Some(ev)
            } else {
                tokio::select! {
                    biased;
                    _ = hangup.cancelled() => break "hung up",
                    _ = &mut connect_deadline, if !connected => break "the peer did not connect in time (webrtc.connect_timeout_ms)",
                    ev = out_rx.recv() => {
                        let Some(ev) = ev else { break "the session ended" };
                        observer.observe(&ev);
                        // The spoken answer (24 kHz PCM16, base64) goes out on the Opus
                        // track instead of silence; as in OpenAI's WebRTC flow the audio
                        // itself is not sent as data channel events.
                        if let ServerEvent::ResponseOutputAudioDelta { delta, response_id, .. } = &ev {
                            if cleared_response.as_deref() == Some(response_id) {
                                continue;
                            }
                            if let Some(out) = ctx.calls.audio_out(&call_id) {
                                use base64::Engine;
                                let bytes = base64::engine::general_purpose::STANDARD.decode(delta).unwrap_or_default();
                                let samples: Vec<f32> =
                                    bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0).collect();
                                audio_response = Some(response_id.clone());
                                if !out.send_24k(response_id, &samples).await {
                                    break "the call's audio track closed";
                                }
                            }
                            continue;
                        }
                        // A response's end: its audio stops once sent; a cancelled one
                        // (barge-in under server VAD, response.cancel) is cut off now.
                        if let ServerEvent::ResponseDone { response } = &ev {
                            if let Some(out) = ctx.calls.audio_out(&call_id) {
                                if response.status == crate::protocol::ResponseStatus::Cancelled {
                                    out.clear();
                                }
                                let _ = out.finish(&response.id).await;
                            }
                        }
                        // The camera samples faster while the user speaks.
                        match &ev {
                            ServerEvent::InputAudioBufferSpeechStarted { .. } => video.speaking.store(true, Ordering::Relaxed),
                            ServerEvent::InputAudioBufferSpeechStopped { .. } => video.speaking.store(false, Ordering::Relaxed),
                            _ => {}
                        }
                        let Some(text) = to_wire(&ev, ctx.dialect) else { continue };
                        match &channel {
                            Some(dc) => {
                                match tokio::time::timeout(ctx.read_timeout, dc.send_text(&text)).await {
                                    Ok(Ok(())) => {}
                                    Ok(Err(_)) => break "the data channel closed",
                                    Err(_) => break "the peer read nothing for server.client_read_timeout_ms",
                                }
                            }
                            None if backlog.len() < MAX_BACKLOG => backlog.push_back(text),
                            None => break "the data channel never opened",
                        }
                        continue;
                    }
                    ev = events.recv() => ev,
                }
            };
            match ev {
                None => break "the peer connection stopped",
                Some(PeerEvent::State(state)) => {
                    tracing::debug!(call = %call_id, %state, "peer connection state");
                    match state {
                        RTCPeerConnectionState::Connected if !connected => {
                            connected = true;
                            ctx.calls.connected();
                            tokio::spawn(send_audio(self.track.clone(), self.sender.clone(), self.ssrc, outgoing.take(), playback_tx.clone(), done.clone()));
                        }
                        RTCPeerConnectionState::Failed => break "ICE or DTLS failed",
                        RTCPeerConnectionState::Closed => break "the peer closed the connection",
                        _ => {}
                    }
                }
                Some(PeerEvent::GatheringComplete) => {}
                Some(PeerEvent::DataChannel(dc)) => {
                    let label = dc.label().await.unwrap_or_default();
                    if label != super::datachannel::LABEL || channel.is_some() {
                        tracing::debug!(call = %call_id, %label, "ignoring a data channel");
                        continue;
                    }
                    let (dc2, in_tx2, tx2, done2, max) = (dc.clone(), in_tx.clone(), self.tx.clone(), done.clone(), ctx.max_message_bytes);
                    let (clear_tx, mut clear_rx) = mpsc::unbounded_channel();
                    let tx3 = self.tx.clone();
                    tokio::spawn(async move {
                        while clear_rx.recv().await.is_some() {
                            if tx3.send(PeerEvent::ClearAudio).is_err() {
                                break;
                            }
                        }
                    });
                    tokio::spawn(async move {
                        super::datachannel::read_events(dc2, in_tx2, clear_tx, max, done2).await;
                        let _ = tx2.send(PeerEvent::EventsClosed);
                    });
                    let mut failed = false;
                    for text in backlog.drain(..) {
                        if dc.send_text(&text).await.is_err() {
                            failed = true;
                            break;
                        }
                    }
                    if failed {
                        break "the data channel closed";
                    }
                    channel = Some(dc);
                }
                Some(PeerEvent::Track(track)) => match track.kind().await {
                    RtpCodecKind::Audio => {
                        tokio::spawn(read_audio(track, in_tx.clone(), done.clone()));
                    }
                    RtpCodecKind::Video => {
                        tokio::spawn(super::video::read_video(track, in_tx.clone(), ctx.video.clone(), video.clone(), started, done.clone()));
                    }
                    _ => {}
                },
                Some(PeerEvent::EventsClosed) => break "the data channel closed",
                Some(PeerEvent::ClearAudio) => {
                    // The audio still queued is dropped (the send task reports
                    // output_audio_buffer.cleared), and so are the rest of the
                    // response's deltas should it still be generating.
                    if let Some(out) = ctx.calls.audio_out(&call_id) {
                        out.clear();
                    }
                    cleared_response = audio_response.clone();
                }
            }
        };
        tracing::info!(call = %call_id, "webrtc call ending: {why}");
        // Stop the readers (they hold session senders), the session, then the peer.
        done.cancel();
        session_end.cancel();
        drop(in_tx);
        let _ = session_task.await;
        // The session's last events (a shutdown notice) go out if the channel is up.
        while let Ok(ev) = out_rx.try_recv() {
            observer.observe(&ev);
            if let (Some(dc), Some(text)) = (&channel, to_wire(&ev, ctx.dialect)) {
                let _ = tokio::time::timeout(Duration::from_millis(200), dc.send_text(&text)).await;
            }
        }
        drop(observer);
        let _ = self.pc.close().await;
        ctx.calls.unregister(&call_id, connected, started.elapsed(), why);
        tracing::info!(call = %call_id, "webrtc call closed");
    }
}

/// The microphone: Opus packets → 48 kHz samples → the session.
async fn read_audio(track: Arc<dyn TrackRemote>, session: mpsc::Sender<SessionInput>, done: CancellationToken) {
    let mut input = match OpusInput::new() {
        Ok(i) => i,
        Err(e) => {
            tracing::error!("cannot start the Opus decoder: {e}");
            return;
        }
    };
    let mut samples = Vec::new();
    loop {
        let ev = tokio::select! {
            _ = done.cancelled() => break,
            ev = track.poll() => ev,
        };
        match ev {
            None | Some(TrackRemoteEvent::OnEnded) => break,
            Some(TrackRemoteEvent::OnRtpPacket(p)) => {
                input.push(p.header.timestamp, &p.payload, &mut samples);
                if !samples.is_empty() && session.send(SessionInput::TrackAudio { rate: OPUS_RATE, samples: std::mem::take(&mut samples) }).await.is_err() {
                    break;
                }
            }
            Some(_) => {}
        }
    }
    tracing::debug!(packets = input.packets, concealed_samples = input.concealed_samples, "audio track ended");
}

/// hark's track: one Opus packet every 20 ms, from the [`audio::AudioOut`] queue or silence.
async fn send_audio(
    track: Arc<TrackLocalStaticSample>,
    sender: Arc<dyn RtpSender>,
    ssrc: u32,
    out: Option<OutgoingAudio>,
    playback: mpsc::WeakSender<ServerEvent>,
    done: CancellationToken,
) {
    let mut out = match out.map(Ok).unwrap_or_else(|| audio::outgoing().map(|(_, o)| o)) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!("cannot start the Opus encoder: {e}");
            return;
        }
    };
    let payload_type = match sender.get_parameters().await {
        Ok(p) => match p.rtp_parameters.codecs.first() {
            Some(c) => c.payload_type,
            None => return,
        },
        Err(_) => return,
    };
    let mut tick = tokio::time::interval(OutgoingAudio::FRAME);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut report = Vec::new();
        let packet = match out.next_packet(&mut report) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("opus encoding failed: {e}");
                return;
            }
        };
        let sample = Sample { data: bytes::Bytes::from(packet), duration: OutgoingAudio::FRAME, ..Sample::new(std::time::Instant::now()) };
        if track.sample_writer(ssrc, payload_type).write_sample(&sample).await.is_err() {
            return;
        }
        for p in report {
            let ev = match p {
                audio::Playback::Started(response_id) => ServerEvent::OutputAudioBufferStarted { response_id },
                audio::Playback::Stopped(response_id) => ServerEvent::OutputAudioBufferStopped { response_id },
                audio::Playback::Cleared(response_id) => ServerEvent::OutputAudioBufferCleared { response_id },
            };
            // Never wait here: the track's 20 ms pace comes first.
            match playback.upgrade() {
                Some(tx) => {
                    let _ = tx.try_send(ev);
                }
                None => return,
            }
        }
    }
}
