//! The camera: VP8 or H.264 over RTP, sampled into the session as images.
//!
//! Only sampled frames are decoded. An inter frame needs every frame before it, so
//! decoding "only some" frames means decoding keyframes: when a sample is due, hark
//! asks the browser for a keyframe (RTCP PLI), decodes that one frame alone (libvpx for
//! VP8, OpenH264 for H.264: see `h264.rs`), converts
//! and resizes it to the frame budget (both sides multiples of 48, at most
//! `frame_tokens` 48×48 patches), and sends it to the session as a JPEG data URL. The
//! rest of the stream is dropped unparsed beyond the RTP payload header: no frame is
//! kept beyond the one being sampled.
//!
//! Rate: `fps_speaking` while the user speaks, `fps_idle` otherwise (the call task
//! tells the sampler from the session's own speech_started/stopped events).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use base64::Engine;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::h264::{H264Assembler, H264Decoder};
use crate::session::SessionInput;

/// How often frames are sampled, and how big they may be.
#[derive(Debug, Clone)]
pub struct VideoSettings {
    pub fps_speaking: f32,
    pub fps_idle: f32,
    pub frame_tokens: usize,
}

/// Shared between the call task and its camera reader.
#[derive(Debug, Default)]
pub struct VideoState {
    /// The session's VAD says the user is speaking.
    pub speaking: AtomicBool,
    /// Frames sampled into the session so far.
    pub sampled: AtomicU64,
    /// Keyframes requested (PLI sent).
    pub keyframe_requests: AtomicU64,
    /// Time spent decoding sampled frames, µs (decode + colour conversion).
    pub decode_micros: AtomicU64,
    /// The camera's codec ("vp8", "h264"), once its track arrived.
    pub codec: std::sync::Mutex<String>,
}

/// A keyframe asked for but not seen this long is asked for again.
const PLI_RETRY: Duration = Duration::from_millis(500);
/// Largest frame assembled (a 1080p keyframe is well under this).
pub(super) const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;
/// JPEG quality of frames handed to the session.
const JPEG_QUALITY: u8 = 85;
/// One patch of the model's image grid.
const PATCH: usize = 48;

#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error("{0} decoder: {1}")]
    Decoder(&'static str, String),
    #[error("unsupported decoded image format {0}")]
    Format(u32),
    #[error("jpeg: {0}")]
    Jpeg(String),
}

/// When the next frame is due. Samples are scheduled on a fixed grid (each due time
/// is the last one plus the interval), so the time a keyframe takes to arrive does not
/// stretch the interval: the rate stays the configured one. The grid follows the
/// current state, so a user who starts speaking gets the faster rate at once.
#[derive(Debug)]
pub struct Sampler {
    settings: VideoSettings,
    /// The due time of the last sample taken.
    last_due: Option<Instant>,
    /// How long a keyframe takes to come after it is asked for (smoothed): the
    /// request goes out this much before the frame is due.
    lead: Duration,
}

/// Longest lead: a keyframe slower than this is simply late.
const MAX_LEAD: Duration = Duration::from_millis(300);

impl Sampler {
    pub fn new(settings: VideoSettings) -> Self {
        Self { settings, last_due: None, lead: Duration::from_millis(50) }
    }

    fn interval(&self, speaking: bool) -> Option<Duration> {
        let fps = if speaking { self.settings.fps_speaking } else { self.settings.fps_idle };
        (fps > 0.0).then(|| Duration::from_secs_f32(1.0 / fps))
    }

    /// When the next frame is due; `None`: sampling is off in this state.
    pub fn next_due(&self, speaking: bool) -> Option<Instant> {
        let interval = self.interval(speaking)?;
        Some(match self.last_due {
            None => Instant::now(),
            Some(last) => last + interval,
        })
    }

    /// Whether a frame at `now` may be taken (the window opens `lead` early, when the
    /// keyframe asked for ahead of time arrives).
    pub fn due(&self, now: Instant, speaking: bool) -> bool {
        self.next_due(speaking).is_some_and(|d| now + self.lead >= d)
    }

    /// A frame was taken at `at`; `asked` is when its keyframe was requested.
    pub fn taken(&mut self, at: Instant, speaking: bool, asked: Option<Instant>) {
        if let Some(asked) = asked {
            let took = at.duration_since(asked).min(MAX_LEAD);
            self.lead = (self.lead * 3 + took) / 4;
        }
        let interval = self.interval(speaking).unwrap_or_default();
        self.last_due = Some(match self.last_due.map(|last| last + interval) {
            // Far behind (sampling was off, or the stream stalled): start a new grid.
            Some(due) if at <= due + interval => due,
            _ => at,
        });
    }
}

/// VP8 frames out of RTP payloads (RFC 7741): a frame starts at a packet with S=1 and
/// partition 0, and ends at the RTP marker. A gap in sequence numbers spoils the frame.
#[derive(Default)]
struct Vp8Assembler {
    frame: Vec<u8>,
    in_frame: bool,
    spoiled: bool,
    last_seq: Option<u16>,
}

impl Vp8Assembler {
    /// Feeds one packet; returns a complete frame at its last packet.
    fn push(&mut self, seq: u16, marker: bool, payload: &[u8]) -> Option<Vec<u8>> {
        if self.last_seq.is_some_and(|l| l.wrapping_add(1) != seq) {
            self.spoiled = true;
        }
        self.last_seq = Some(seq);
        let (start, data) = vp8_payload(payload)?;
        if start {
            self.frame.clear();
            self.in_frame = true;
            self.spoiled = false;
        }
        if !self.in_frame {
            return None;
        }
        if self.frame.len() + data.len() > MAX_FRAME_BYTES {
            self.in_frame = false;
            return None;
        }
        self.frame.extend_from_slice(data);
        if marker {
            self.in_frame = false;
            if !self.spoiled {
                return Some(std::mem::take(&mut self.frame));
            }
        }
        None
    }
}

/// The VP8 payload descriptor: (starts a frame, the VP8 bytes after it).
fn vp8_payload(p: &[u8]) -> Option<(bool, &[u8])> {
    let b0 = *p.first()?;
    let start = b0 & 0x10 != 0 && b0 & 0x07 == 0;
    let mut i = 1;
    if b0 & 0x80 != 0 {
        let x = *p.get(i)?;
        i += 1;
        if x & 0x80 != 0 {
            // PictureID: 7 or 15 bits.
            let m = *p.get(i)? & 0x80 != 0;
            i += if m { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            i += 1; // TL0PICIDX
        }
        if x & 0x30 != 0 {
            i += 1; // TID/KEYIDX
        }
    }
    p.get(i..).map(|d| (start, d))
}

/// A VP8 frame is a keyframe when bit 0 of its first byte is clear.
fn is_keyframe(frame: &[u8]) -> bool {
    frame.first().is_some_and(|b| b & 0x01 == 0)
}

/// libvpx's VP8 decoder. Boxed: libvpx keeps pointers into the context.
struct Vp8Decoder {
    ctx: Box<vpx_sys::vpx_codec_ctx_t>,
}

// The context is used from one task at a time.
unsafe impl Send for Vp8Decoder {}

impl Vp8Decoder {
    fn new() -> Result<Self, VideoError> {
        // SAFETY: a zeroed context is what vpx_codec_dec_init_ver expects to fill in.
        let mut ctx: Box<vpx_sys::vpx_codec_ctx_t> = Box::new(unsafe { std::mem::zeroed() });
        let cfg = vpx_sys::vpx_codec_dec_cfg_t { threads: 1, w: 0, h: 0 };
        // SAFETY: valid pointers; the ABI version is the one the bindings were made for.
        let err = unsafe {
            vpx_sys::vpx_codec_dec_init_ver(&mut *ctx, vpx_sys::vpx_codec_vp8_dx(), &cfg, 0, vpx_sys::VPX_DECODER_ABI_VERSION as i32)
        };
        if err != vpx_sys::vpx_codec_err_t::VPX_CODEC_OK {
            return Err(VideoError::Decoder("vp8", format!("init failed ({err:?})")));
        }
        Ok(Self { ctx })
    }

    /// Decodes one frame → RGB8 (width, height).
    fn decode_rgb(&mut self, frame: &[u8]) -> Result<Option<(Vec<u8>, usize, usize)>, VideoError> {
        // SAFETY: `frame` outlives the call; the context was initialised.
        let err = unsafe { vpx_sys::vpx_codec_decode(&mut *self.ctx, frame.as_ptr(), frame.len() as u32, std::ptr::null_mut(), 0) };
        if err != vpx_sys::vpx_codec_err_t::VPX_CODEC_OK {
            return Err(VideoError::Decoder("vp8", format!("decode failed ({err:?})")));
        }
        let mut iter: vpx_sys::vpx_codec_iter_t = std::ptr::null();
        let mut out = None;
        loop {
            // SAFETY: iterates images owned by the decoder until the next decode call.
            let img = unsafe { vpx_sys::vpx_codec_get_frame(&mut *self.ctx, &mut iter) };
            if img.is_null() {
                break;
            }
            // SAFETY: non-null image from libvpx, valid until the next decode.
            out = Some(unsafe { i420_to_rgb(&*img)? });
        }
        Ok(out)
    }
}

impl Drop for Vp8Decoder {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`, destroyed once.
        unsafe { vpx_sys::vpx_codec_destroy(&mut *self.ctx) };
    }
}

/// libvpx's I420 picture as plane slices, converted by [`yuv420_to_rgb`].
///
/// # Safety
/// `img` comes from libvpx and is valid until the next decode call; its planes hold
/// `stride × rows` bytes each (rows: `d_h`, half of it rounded up for the chroma planes).
unsafe fn i420_to_rgb(img: &vpx_sys::vpx_image_t) -> Result<(Vec<u8>, usize, usize), VideoError> {
    if img.fmt != vpx_sys::vpx_img_fmt::VPX_IMG_FMT_I420 {
        return Err(VideoError::Format(img.fmt as u32));
    }
    let (w, h) = (img.d_w as usize, img.d_h as usize);
    let plane = |i: usize, rows: usize| {
        let stride = img.stride[i].max(0) as usize;
        // SAFETY: as the function's contract says, libvpx allocated `stride × rows` bytes.
        (unsafe { std::slice::from_raw_parts(img.planes[i], stride * rows) }, stride)
    };
    yuv420_to_rgb(plane(0, h), plane(1, h.div_ceil(2)), plane(2, h.div_ceil(2)), w, h)
}

/// BT.601 limited-range YUV 4:2:0 → RGB8, as browsers encode camera video, over
/// planes given as slices with their strides (libvpx's and OpenH264's output); a
/// plane shorter than its size says is an error, not a panic.
pub(super) fn yuv420_to_rgb(
    (y_plane, ys): (&[u8], usize),
    (u_plane, us): (&[u8], usize),
    (v_plane, vs): (&[u8], usize),
    w: usize,
    h: usize,
) -> Result<(Vec<u8>, usize, usize), VideoError> {
    let fits = |plane: &[u8], stride: usize, pw: usize, ph: usize| ph == 0 || (stride >= pw && plane.len() >= (ph - 1) * stride + pw);
    if w == 0 || h == 0 || !fits(y_plane, ys, w, h) || !fits(u_plane, us, w.div_ceil(2), h.div_ceil(2)) || !fits(v_plane, vs, w.div_ceil(2), h.div_ceil(2)) {
        return Err(VideoError::Decoder("video", format!("a decoded {w}x{h} picture with planes too small for it")));
    }
    let mut rgb = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let yy = y_plane[y * ys + x] as f32;
            let u = u_plane[(y / 2) * us + x / 2] as f32 - 128.0;
            let v = v_plane[(y / 2) * vs + x / 2] as f32 - 128.0;
            let c = 1.164 * (yy - 16.0);
            let px = &mut rgb[(y * w + x) * 3..][..3];
            px[0] = (c + 1.596 * v).clamp(0.0, 255.0) as u8;
            px[1] = (c - 0.392 * u - 0.813 * v).clamp(0.0, 255.0) as u8;
            px[2] = (c + 2.017 * u).clamp(0.0, 255.0) as u8;
        }
    }
    Ok((rgb, w, h))
}

/// A camera stream hark decodes: its frame assembler and its decoder.
enum Camera {
    Vp8(Vp8Assembler, Vp8Decoder),
    H264(H264Assembler, H264Decoder),
}

impl Camera {
    /// For the track's codec (its mime type); `Ok(None)`: not one hark decodes.
    fn for_mime(mime: &str) -> Result<Option<Self>, VideoError> {
        Ok(match mime {
            "video/vp8" => Some(Camera::Vp8(Vp8Assembler::default(), Vp8Decoder::new()?)),
            "video/h264" => Some(Camera::H264(H264Assembler::default(), H264Decoder::new()?)),
            _ => None,
        })
    }

    /// Not sampling: any partial frame is dropped.
    fn reset(&mut self) {
        match self {
            Camera::Vp8(a, _) => *a = Vp8Assembler::default(),
            Camera::H264(a, _) => *a = H264Assembler::default(),
        }
    }

    /// Feeds one RTP packet; a complete frame and whether it is a keyframe.
    fn push(&mut self, header: &rtc::rtp::Header, payload: &[u8]) -> Option<(Vec<u8>, bool)> {
        match self {
            Camera::Vp8(a, _) => a.push(header.sequence_number, header.marker, payload).map(|f| {
                let key = is_keyframe(&f);
                (f, key)
            }),
            Camera::H264(a, _) => a.push(header.sequence_number, header.timestamp, header.marker, payload).map(|au| (au.bytes, au.keyframe)),
        }
    }

    fn decode_rgb(&mut self, frame: &[u8]) -> Result<Option<(Vec<u8>, usize, usize)>, VideoError> {
        match self {
            Camera::Vp8(_, d) => d.decode_rgb(frame),
            Camera::H264(_, d) => d.decode_rgb(frame),
        }
    }
}

/// The largest size keeping the aspect ratio whose sides are multiples of 48 and that
/// holds at most `budget` patches (the model's per-frame image budget).
pub fn frame_size(width: usize, height: usize, budget: usize) -> (usize, usize) {
    if width == 0 || height == 0 || budget == 0 {
        return (0, 0);
    }
    let scale = (budget as f64 / ((width as f64 / PATCH as f64) * (height as f64 / PATCH as f64))).sqrt();
    let mut gw = ((width as f64 * scale / PATCH as f64).floor() as usize).max(1);
    let mut gh = ((height as f64 * scale / PATCH as f64).floor() as usize).max(1);
    while gw * gh > budget {
        if gw >= gh { gw -= 1 } else { gh -= 1 }
    }
    (gw * PATCH, gh * PATCH)
}

/// RGB → resized JPEG data URL.
fn to_data_url(rgb: Vec<u8>, w: usize, h: usize, budget: usize) -> Result<String, VideoError> {
    let img = image::RgbImage::from_raw(w as u32, h as u32, rgb).ok_or_else(|| VideoError::Jpeg("bad image size".into()))?;
    let (tw, th) = frame_size(w, h, budget);
    let img = image::imageops::resize(&img, tw as u32, th as u32, image::imageops::FilterType::Triangle);
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, JPEG_QUALITY)
        .encode(img.as_raw(), tw as u32, th as u32, image::ExtendedColorType::Rgb8)
        .map_err(|e| VideoError::Jpeg(e.to_string()))?;
    Ok(format!("data:image/jpeg;base64,{}", base64::engine::general_purpose::STANDARD.encode(jpeg)))
}

/// Reads the camera track until it ends, sampling frames into the session.
pub async fn read_video(
    track: Arc<dyn TrackRemote>,
    session: mpsc::Sender<SessionInput>,
    settings: VideoSettings,
    state: Arc<VideoState>,
    started: Instant,
    done: CancellationToken,
) {
    let mime = match track.ssrcs().await.first() {
        Some(&ssrc) => track.codec(ssrc).await.map(|c| c.mime_type.to_ascii_lowercase()).unwrap_or_default(),
        None => String::new(),
    };
    let media_ssrc = track.ssrcs().await.first().copied().unwrap_or(0);
    *state.codec.lock().unwrap_or_else(|p| p.into_inner()) = mime.trim_start_matches("video/").to_string();
    let mut camera = match Camera::for_mime(&mime) {
        Ok(Some(c)) => Some(c),
        Ok(None) => {
            tracing::warn!("camera frames are not sampled: hark decodes VP8 and H.264, the browser sends {mime:?}");
            None
        }
        Err(e) => {
            tracing::warn!("camera frames are not sampled: {e}");
            None
        }
    };
    let budget = settings.frame_tokens;
    let mut sampler = Sampler::new(settings);
    let mut asked: Option<Instant> = None;
    loop {
        let ev = tokio::select! {
            _ = done.cancelled() => break,
            ev = track.poll() => ev,
        };
        let packet = match ev {
            None | Some(TrackRemoteEvent::OnEnded) => break,
            Some(TrackRemoteEvent::OnRtpPacket(p)) => p,
            Some(_) => continue,
        };
        let Some(cam) = camera.as_mut() else { continue };
        let now = Instant::now();
        if !sampler.due(now, state.speaking.load(Ordering::Relaxed)) {
            // Not sampling: nothing is assembled or decoded.
            cam.reset();
            asked = None;
            continue;
        }
        let Some((frame, keyframe)) = cam.push(&packet.header, &packet.payload) else { continue };
        if !keyframe {
            if asked.is_none_or(|t| now.duration_since(t) >= PLI_RETRY) {
                asked = Some(now);
                state.keyframe_requests.fetch_add(1, Ordering::Relaxed);
                let _ = track.write_rtcp(vec![Box::new(PictureLossIndication { sender_ssrc: 0, media_ssrc })]).await;
            }
            continue;
        }
        let t = Instant::now();
        let decoded = cam.decode_rgb(&frame);
        state.decode_micros.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        let url = match decoded.and_then(|d| d.map(|(rgb, w, h)| to_data_url(rgb, w, h, budget)).transpose()) {
            Ok(Some(url)) => url,
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!("camera frame dropped: {e}");
                continue;
            }
        };
        sampler.taken(now, state.speaking.load(Ordering::Relaxed), asked);
        asked = None;
        state.sampled.fetch_add(1, Ordering::Relaxed);
        let at_ms = now.duration_since(started).as_millis() as u64;
        if session.send(SessionInput::CameraFrame { data_url: url, at_ms }).await.is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_sizes_fit_the_budget() {
        for (w, h) in [(640, 480), (1280, 720), (320, 240), (480, 640), (100, 2000)] {
            let (tw, th) = frame_size(w, h, 70);
            assert!(tw % 48 == 0 && th % 48 == 0 && tw > 0 && th > 0, "{w}x{h} → {tw}x{th}");
            assert!((tw / 48) * (th / 48) <= 70, "{w}x{h} → {tw}x{th}");
        }
        assert_eq!(frame_size(640, 480, 70), (432, 336), "9×7 = 63 patches keep 4:3");
    }

    #[test]
    fn sampling_rate_follows_speech() {
        let mut s = Sampler::new(VideoSettings { fps_speaking: 1.0, fps_idle: 0.2, frame_tokens: 70 });
        let t0 = Instant::now();
        assert!(s.due(t0, false));
        s.taken(t0, false, None);
        assert!(!s.due(t0 + Duration::from_secs(2), false));
        assert!(s.due(t0 + Duration::from_secs(2), true), "speaking: 1 fps");
        assert!(s.due(t0 + Duration::from_secs(5), false), "idle: one per 5 s");
        // A keyframe 200 ms late does not push the grid: the next is due at 2 s.
        s.taken(t0 + Duration::from_millis(1200), true, Some(t0 + Duration::from_millis(1000)));
        let next = s.next_due(true).unwrap();
        assert!(next <= t0 + Duration::from_millis(2000), "{:?}", next - t0);
    }

    /// A real VP8 keyframe (ffmpeg's libvpx encoder, testsrc pattern) through hark's
    /// decoder, colour conversion and resize.
    #[test]
    fn decodes_a_real_keyframe() {
        let dir = tempfile::tempdir().unwrap();
        let ivf = dir.path().join("t.ivf");
        let st = std::process::Command::new("ffmpeg")
            .args(["-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=15", "-frames:v", "1", "-c:v", "libvpx", "-f", "ivf"])
            .arg(&ivf)
            .status()
            .expect("ffmpeg is missing: run scripts/test, which installs it");
        assert!(st.success());
        let bytes = std::fs::read(&ivf).unwrap();
        // IVF: a 32-byte file header, then per frame 4 bytes of size and 8 of pts.
        let size = u32::from_le_bytes(bytes[32..36].try_into().unwrap()) as usize;
        let frame = &bytes[44..44 + size];
        assert!(is_keyframe(frame));
        let mut dec = Vp8Decoder::new().unwrap();
        let (rgb, w, h) = dec.decode_rgb(frame).unwrap().unwrap();
        assert_eq!((w, h), (320, 240));
        // testsrc's colour bars: somewhere in the frame is a saturated red, green, blue.
        let px = |x: usize, y: usize| &rgb[(y * w + x) * 3..][..3];
        let has = |f: &dyn Fn(&[u8]) -> bool| (0..h).step_by(4).any(|y| (0..w).step_by(4).any(|x| f(px(x, y))));
        assert!(has(&|p| p[0] > 180 && p[1] < 80 && p[2] < 80), "red");
        assert!(has(&|p| p[1] > 180 && p[0] < 80 && p[2] < 80), "green");
        assert!(has(&|p| p[2] > 180 && p[0] < 80 && p[1] < 80), "blue");
        let url = to_data_url(rgb, w, h, 70).unwrap();
        let jpeg = base64::engine::general_purpose::STANDARD.decode(url.strip_prefix("data:image/jpeg;base64,").unwrap()).unwrap();
        let img = image::load_from_memory(&jpeg).unwrap();
        assert_eq!((img.width(), img.height()), (432, 336), "9×7 patches of 48 px");
        // Garbage is an error, not a crash.
        assert!(dec.decode_rgb(&[0x00, 0x01, 0x02]).is_err());
    }

    #[test]
    fn vp8_descriptor() {
        // X=1, S=1, PID=0; I=1 with a 15-bit picture id; then a keyframe's first byte.
        let p = [0x90, 0x80, 0x81, 0x23, 0x10, 0xAA];
        let (start, data) = vp8_payload(&p).unwrap();
        assert!(start);
        assert_eq!(data, &[0x10, 0xAA]);
        assert!(is_keyframe(data));
        let mut a = Vp8Assembler::default();
        assert!(a.push(1, false, &p).is_none());
        assert_eq!(a.push(2, true, &[0x80, 0x00, 0xBB]).unwrap(), vec![0x10, 0xAA, 0xBB]);
        // A lost packet spoils the frame.
        assert!(a.push(3, false, &p).is_none());
        assert!(a.push(5, true, &[0x00, 0xBB]).is_none());
    }
}
