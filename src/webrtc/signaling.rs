//! The SDP offer a browser posts to `/v1/realtime/calls`: parsed and checked before any
//! peer connection is built, so a bad offer is a clear 400 and costs no sockets.

use ::webrtc::peer_connection::RTCSessionDescription;

/// Largest SDP accepted. Chromium's offers with audio, video and a data channel are
/// ≈5 KB; anything near this is not an offer.
pub const MAX_SDP_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OfferError {
    #[error("The SDP offer is empty.")]
    Empty,
    #[error("The SDP offer is larger than {MAX_SDP_BYTES} bytes.")]
    TooLarge,
    #[error("The SDP offer could not be parsed: {0}.")]
    Malformed(String),
    #[error("The SDP offer has no audio section (m=audio); hark needs the microphone's audio. Add an audio transceiver or track before creating the offer.")]
    NoAudio,
    #[error("The SDP offer's audio offers only {0}; hark decodes Opus (audio/opus 48000/2).")]
    NoOpus(String),
    #[error("The SDP offer's video offers only {0}; hark decodes VP8 and H.264 (packetization-mode 0 or 1). Offer one of them, or leave the camera out.")]
    NoVideoCodec(String),
    #[error("The SDP offer has no data channel (m=application); create the \"oai-events\" data channel before creating the offer.")]
    NoDataChannel,
}

/// What hark can use of an offer.
#[derive(Debug)]
pub struct Offer {
    pub description: RTCSessionDescription,
    /// The offer carries video in a codec hark decodes.
    pub video: bool,
}

/// Video codecs hark decodes (see `video.rs`, `h264.rs`).
const DECODABLE_VIDEO: [&str; 2] = ["vp8", "h264"];
/// Not codecs of their own: retransmission, redundancy and FEC wrap the others.
const VIDEO_HELPERS: [&str; 4] = ["rtx", "red", "ulpfec", "flexfec-03"];

pub fn parse_offer(sdp: &str) -> Result<Offer, OfferError> {
    if sdp.trim().is_empty() {
        return Err(OfferError::Empty);
    }
    if sdp.len() > MAX_SDP_BYTES {
        return Err(OfferError::TooLarge);
    }
    // Pages and curl often send bare `\n`; SDP wants CRLF, and the parser is strict.
    let normalized = if sdp.contains("\r\n") { sdp.to_string() } else { sdp.replace('\n', "\r\n") };
    let description = RTCSessionDescription::offer(normalized).map_err(|e| OfferError::Malformed(e.to_string()))?;
    let parsed = description.unmarshal().map_err(|e| OfferError::Malformed(e.to_string()))?;
    let codecs_of = |kind: &str| -> Vec<String> {
        parsed
            .media_descriptions
            .iter()
            .filter(|m| m.media_name.media == kind && m.media_name.port.value != 0)
            .flat_map(|m| m.attributes.iter())
            .filter(|a| a.key == "rtpmap")
            .filter_map(|a| a.value.as_deref()?.split_whitespace().nth(1)?.split('/').next().map(str::to_ascii_lowercase))
            .collect()
    };
    if !parsed.media_descriptions.iter().any(|m| m.media_name.media == "audio" && m.media_name.port.value != 0) {
        return Err(OfferError::NoAudio);
    }
    let audio = codecs_of("audio");
    if !audio.iter().any(|c| c == "opus") {
        let mut offered = audio.clone();
        offered.dedup();
        let offered = if offered.is_empty() { "no codec".to_string() } else { offered.join(", ") };
        return Err(OfferError::NoOpus(offered));
    }
    if !parsed.media_descriptions.iter().any(|m| m.media_name.media == "application") {
        return Err(OfferError::NoDataChannel);
    }
    // A camera in codecs hark cannot decode would be accepted and then silently never
    // reach the model: refused instead, naming what was offered.
    let mut video_codecs: Vec<String> = codecs_of("video").into_iter().filter(|c| !VIDEO_HELPERS.contains(&c.as_str())).collect();
    let video = video_codecs.iter().any(|c| DECODABLE_VIDEO.contains(&c.as_str()));
    if !video && !video_codecs.is_empty() {
        video_codecs.dedup();
        return Err(OfferError::NoVideoCodec(video_codecs.join(", ")));
    }
    Ok(Offer { description, video })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n";
    const DATA: &str = "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=sctp-port:5000\r\n";

    fn audio(codecs: &str) -> String {
        format!("m=audio 9 UDP/TLS/RTP/SAVPF 0\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendrecv\r\n{codecs}")
    }

    #[test]
    fn checks() {
        assert_eq!(parse_offer("").unwrap_err(), OfferError::Empty);
        assert!(matches!(parse_offer("hello").unwrap_err(), OfferError::Malformed(_)));
        assert_eq!(parse_offer(&format!("{HEAD}{DATA}")).unwrap_err(), OfferError::NoAudio);
        let pcmu = format!("{HEAD}{}{DATA}", audio("a=rtpmap:0 PCMU/8000\r\n"));
        assert_eq!(parse_offer(&pcmu).unwrap_err(), OfferError::NoOpus("pcmu".into()));
        let no_dc = format!("{HEAD}{}", audio("a=rtpmap:111 opus/48000/2\r\n"));
        assert_eq!(parse_offer(&no_dc).unwrap_err(), OfferError::NoDataChannel);
        let ok = format!("{HEAD}{}{DATA}", audio("a=rtpmap:111 opus/48000/2\r\n"));
        assert!(!parse_offer(&ok).unwrap().video);
        assert!(parse_offer(&ok.replace("\r\n", "\n")).is_ok(), "bare LF is accepted");
        let video = |codecs: &str| format!("{ok}m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:2\r\n{codecs}");
        let vp9 = video("a=rtpmap:98 VP9/90000\r\na=rtpmap:99 rtx/90000\r\na=rtpmap:45 AV1/90000\r\n");
        assert_eq!(parse_offer(&vp9).unwrap_err(), OfferError::NoVideoCodec("vp9, av1".into()));
        assert!(parse_offer(&video("a=rtpmap:102 H264/90000\r\n")).unwrap().video);
    }
}
