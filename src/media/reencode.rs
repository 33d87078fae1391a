//! Images kept at the size a model uses, not as uploaded: a large upload is decoded
//! once on arrival, scaled down and stored as JPEG.

use std::io::Cursor;

use image::{ImageReader, Limits};

/// Largest image hark decodes (as the vision path's own cap).
const MAX_DECODE_PIXELS: u64 = 40_000_000;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReencodeError {
    #[error("cannot read the image: {0}")]
    Decode(String),
    #[error("the image has {0} pixels; at most {MAX_DECODE_PIXELS} are accepted")]
    TooManyPixels(u64),
    #[error("the image does not fit in {0} bytes even scaled down")]
    TooLarge(usize),
}

/// `bytes` (PNG or JPEG) as a JPEG of at most `max_pixels` pixels and `max_bytes`
/// bytes, aspect kept. Never scales up.
pub fn shrink_to_fit(bytes: &[u8], max_pixels: u64, max_bytes: usize) -> Result<Vec<u8>, ReencodeError> {
    let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| ReencodeError::Decode(e.to_string()))?;
    let (w, h) = reader.into_dimensions().map_err(|e| ReencodeError::Decode(e.to_string()))?;
    let pixels = w as u64 * h as u64;
    if pixels > MAX_DECODE_PIXELS || pixels == 0 {
        return Err(ReencodeError::TooManyPixels(pixels));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| ReencodeError::Decode(e.to_string()))?;
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODE_PIXELS * 4 + (64 << 20));
    reader.limits(limits);
    let img = reader.decode().map_err(|e| ReencodeError::Decode(e.to_string()))?.to_rgb8();
    let mut scale = (max_pixels as f64 / pixels as f64).sqrt().min(1.0);
    for _ in 0..8 {
        let (tw, th) = (((w as f64 * scale).round() as u32).max(1), ((h as f64 * scale).round() as u32).max(1));
        let resized = if (tw, th) == (w, h) { img.clone() } else { image::imageops::resize(&img, tw, th, image::imageops::FilterType::Triangle) };
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
            .encode_image(&resized)
            .map_err(|e| ReencodeError::Decode(e.to_string()))?;
        if out.len() <= max_bytes {
            return Ok(out);
        }
        scale *= 0.7;
    }
    Err(ReencodeError::TooLarge(max_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_png_becomes_a_small_jpeg_within_the_pixel_budget() {
        // Noise compresses badly: a 2000×1500 PNG of it is megabytes.
        let mut seed = 1u32;
        let img = image::RgbImage::from_fn(2000, 1500, |_, _| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            image::Rgb([(seed >> 24) as u8, (seed >> 16) as u8, (seed >> 8) as u8])
        });
        let mut png = Vec::new();
        img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        assert!(png.len() > 4 << 20);
        let out = shrink_to_fit(&png, 1120 * 48 * 48, 1 << 20).unwrap();
        assert!(out.len() <= 1 << 20);
        let back = image::load_from_memory(&out).unwrap();
        assert!(back.width() as u64 * back.height() as u64 <= 1120 * 48 * 48);
        assert!((back.width() as f64 / back.height() as f64 - 2000.0 / 1500.0).abs() < 0.01);
        assert!(matches!(shrink_to_fit(b"not an image", 100, 100), Err(ReencodeError::Decode(_))));
    }
}
