//! H.264 camera frames: access units out of RTP (RFC 6184) and Cisco's OpenH264
//! decoder (the `openh264` crate, built from its bundled source; with Debian's nasm
//! its assembly paths make decoding ≈2× faster).
//!
//! Only what browsers send is accepted: packetization-mode 0 and 1, i.e. single NAL
//! units, STAP-A aggregates and FU-A fragments. (The `rtc` crate has an H.264
//! depacketizer, but its STAP-A loop indexes past the end of a truncated packet; a
//! packet from the network must never panic, so this one checks every length.)
//!
//! As for VP8, only sampled frames are decoded, and a sample is an IDR access unit
//! decoded alone: browsers send SPS and PPS with every IDR, and an IDR needs no other
//! frame, so the decoder never has to see the inter frames in between.

use super::video::{yuv420_to_rgb, VideoError, MAX_FRAME_BYTES};

const START_CODE: [u8; 4] = [0, 0, 0, 1];
const NAL_IDR: u8 = 5;
const NAL_STAP_A: u8 = 24;
const NAL_FU_A: u8 = 28;

/// A complete access unit in Annex B form (start codes before each NAL unit).
#[derive(Debug, PartialEq)]
pub struct AccessUnit {
    pub bytes: Vec<u8>,
    /// It holds an IDR slice: decodable on its own.
    pub keyframe: bool,
}

/// Access units out of RTP payloads. An access unit is every packet of one RTP
/// timestamp, ending at the marker bit; a lost packet (a gap in sequence numbers) or a
/// malformed one spoils the unit it falls in, which is then dropped whole.
#[derive(Default)]
pub struct H264Assembler {
    au: Vec<u8>,
    in_au: bool,
    timestamp: u32,
    spoiled: bool,
    keyframe: bool,
    /// Inside a FU-A fragmented NAL unit (its start was seen).
    in_fragment: bool,
    last_seq: Option<u16>,
}

impl H264Assembler {
    /// Feeds one packet; returns the access unit at its last packet.
    pub fn push(&mut self, seq: u16, timestamp: u32, marker: bool, payload: &[u8]) -> Option<AccessUnit> {
        let lost = self.last_seq.is_some_and(|l| l.wrapping_add(1) != seq);
        self.last_seq = Some(seq);
        if self.in_au && timestamp != self.timestamp {
            // The previous unit's last packet (the marker) never came.
            self.in_au = false;
        }
        if !self.in_au {
            self.au.clear();
            self.in_au = true;
            self.timestamp = timestamp;
            // A gap right before a new unit may have taken its first packets.
            self.spoiled = lost;
            self.keyframe = false;
            self.in_fragment = false;
        } else if lost {
            self.spoiled = true;
        }
        if !self.spoiled && self.add(payload).is_none() {
            self.spoiled = true;
        }
        if self.au.len() > MAX_FRAME_BYTES {
            self.spoiled = true;
            self.au = Vec::new();
        }
        if !marker {
            return None;
        }
        self.in_au = false;
        if self.spoiled || self.au.is_empty() || self.in_fragment {
            return None;
        }
        Some(AccessUnit { bytes: std::mem::take(&mut self.au), keyframe: self.keyframe })
    }

    /// Appends one RTP payload's NAL units; `None`: malformed or not allowed.
    fn add(&mut self, p: &[u8]) -> Option<()> {
        let header = *p.first()?;
        match header & 0x1f {
            t @ 1..=23 => {
                if self.in_fragment {
                    return None;
                }
                self.nal(t, p);
            }
            NAL_STAP_A => {
                if self.in_fragment {
                    return None;
                }
                let mut rest = &p[1..];
                while !rest.is_empty() {
                    let len = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
                    let nal = rest.get(2..2 + len).filter(|n| !n.is_empty())?;
                    self.nal(nal[0] & 0x1f, nal);
                    rest = &rest[2 + len..];
                }
            }
            NAL_FU_A => {
                let fu = *p.get(1)?;
                let (start, end, t) = (fu & 0x80 != 0, fu & 0x40 != 0, fu & 0x1f);
                let data = &p[2..];
                if start {
                    if self.in_fragment {
                        return None;
                    }
                    self.au.extend_from_slice(&START_CODE);
                    // The fragmented unit's own header: F and NRI from the indicator.
                    self.au.push((header & 0xe0) | t);
                    self.keyframe |= t == NAL_IDR;
                    self.in_fragment = true;
                } else if !self.in_fragment {
                    return None;
                }
                self.au.extend_from_slice(data);
                if end {
                    self.in_fragment = false;
                }
            }
            // STAP-B, MTAP, FU-B (interleaved mode) and reserved types.
            _ => return None,
        }
        Some(())
    }

    fn nal(&mut self, t: u8, nal: &[u8]) {
        self.keyframe |= t == NAL_IDR;
        self.au.extend_from_slice(&START_CODE);
        self.au.extend_from_slice(nal);
    }
}

/// OpenH264's decoder.
pub struct H264Decoder {
    decoder: openh264::decoder::Decoder,
}

impl H264Decoder {
    pub fn new() -> Result<Self, VideoError> {
        let decoder = openh264::decoder::Decoder::new().map_err(|e| VideoError::Decoder("h264", e.to_string()))?;
        Ok(Self { decoder })
    }

    /// Decodes one access unit → RGB8 (width, height); `None`: no picture came out.
    pub fn decode_rgb(&mut self, au: &[u8]) -> Result<Option<(Vec<u8>, usize, usize)>, VideoError> {
        use openh264::formats::YUVSource;
        let Some(yuv) = self.decoder.decode(au).map_err(|e| VideoError::Decoder("h264", e.to_string()))? else { return Ok(None) };
        let (w, h) = yuv.dimensions();
        let (ys, us, vs) = yuv.strides();
        yuv420_to_rgb((yuv.y(), ys), (yuv.u(), us), (yuv.v(), vs), w, h).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annex_b(nals: &[&[u8]]) -> Vec<u8> {
        nals.iter().flat_map(|n| START_CODE.iter().chain(n.iter()).copied()).collect()
    }

    #[test]
    fn single_stap_a_and_fu_a() {
        let mut a = H264Assembler::default();
        let (sps, pps) = ([0x67, 1, 2, 3], [0x68, 4, 5]);
        // STAP-A of SPS and PPS, then an IDR in three FU-A fragments.
        let mut stap = vec![0x78, 0, 4];
        stap.extend_from_slice(&sps);
        stap.extend_from_slice(&[0, 3]);
        stap.extend_from_slice(&pps);
        assert!(a.push(10, 900, false, &stap).is_none());
        assert!(a.push(11, 900, false, &[0x7c, 0x85, 0xaa]).is_none());
        assert!(a.push(12, 900, false, &[0x7c, 0x05, 0xbb]).is_none());
        let au = a.push(13, 900, true, &[0x7c, 0x45, 0xcc]).unwrap();
        assert!(au.keyframe);
        assert_eq!(au.bytes, annex_b(&[&sps, &pps, &[0x65, 0xaa, 0xbb, 0xcc]]));
        // A single non-IDR slice.
        let au = a.push(14, 1800, true, &[0x41, 0x9a]).unwrap();
        assert!(!au.keyframe);
        assert_eq!(au.bytes, annex_b(&[&[0x41, 0x9a]]));
    }

    /// A real keyframe (ffmpeg's libx264, constrained baseline, testsrc pattern)
    /// through hark's decoder and colour conversion; prints the decode time.
    #[test]
    fn decodes_a_real_keyframe() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("t.h264");
        let st = std::process::Command::new("ffmpeg")
            .args(["-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=640x480:rate=15", "-frames:v", "1"])
            .args(["-c:v", "libx264", "-profile:v", "baseline", "-pix_fmt", "yuv420p", "-f", "h264"])
            .arg(&out)
            .status()
            .expect("ffmpeg is missing: run scripts/test, which installs it");
        assert!(st.success());
        let au = std::fs::read(&out).unwrap();
        let mut d = H264Decoder::new().unwrap();
        let (rgb, w, h) = d.decode_rgb(&au).unwrap().expect("a picture");
        assert_eq!((w, h), (640, 480));
        let px = |x: usize, y: usize| &rgb[(y * w + x) * 3..][..3];
        let has = |f: &dyn Fn(&[u8]) -> bool| (0..h).step_by(4).any(|y| (0..w).step_by(4).any(|x| f(px(x, y))));
        assert!(has(&|p| p[0] > 180 && p[1] < 80 && p[2] < 80), "red");
        assert!(has(&|p| p[1] > 180 && p[0] < 80 && p[2] < 80), "green");
        assert!(has(&|p| p[2] > 180 && p[0] < 80 && p[1] < 80), "blue");
        // Each sample is an IDR decoded alone, as in a call.
        let n = 20;
        let t = std::time::Instant::now();
        for _ in 0..n {
            assert!(d.decode_rgb(&au).unwrap().is_some());
        }
        let total = t.elapsed().as_secs_f64() * 1000.0 / n as f64;
        // OpenH264 alone (built with optimisation even in dev builds, as all dependencies
        // are), without hark's colour conversion.
        let t = std::time::Instant::now();
        for _ in 0..n {
            assert!(d.decoder.decode(&au).unwrap().is_some());
        }
        let decode = t.elapsed().as_secs_f64() * 1000.0 / n as f64;
        eprintln!("h264 640x480 keyframe: {decode:.2} ms OpenH264 decode, {total:.2} ms with the RGB conversion");
    }

    #[test]
    fn loss_and_garbage_spoil_the_unit_without_panicking() {
        let mut a = H264Assembler::default();
        // A lost middle fragment.
        assert!(a.push(1, 90, false, &[0x7c, 0x85, 1]).is_none());
        assert!(a.push(3, 90, true, &[0x7c, 0x45, 3]).is_none());
        // The next unit is whole again.
        assert!(a.push(4, 180, true, &[0x65, 7]).unwrap().keyframe);
        // Truncated STAP-A lengths, a lone FU-A middle, empty and reserved payloads.
        for (i, p) in [&[0x78u8, 0, 9, 1][..], &[0x78, 0], &[0x78, 0, 0], &[0x7c, 0x05, 1], &[0x7c], &[], &[0x1e, 1], &[0x19, 0, 1]].iter().enumerate() {
            let seq = 5 + i as u16;
            assert!(a.push(seq, 1000 + i as u32, true, p).is_none(), "{p:?}");
        }
        // A unit whose marker was lost ends when the timestamp moves on.
        assert!(a.push(20, 5000, false, &[0x41, 1]).is_none());
        assert_eq!(a.push(21, 6000, true, &[0x41, 2]).unwrap().bytes, annex_b(&[&[0x41, 2]]));
        let mut d = H264Decoder::new().unwrap();
        assert!(d.decode_rgb(&annex_b(&[&[0x65, 0xff, 0x00, 0x13]])).map_or(true, |r| r.is_none()), "garbage decodes to nothing");
    }
}
