//! The one typeface of `sere`'s pictures (the curves of `sere plot`, the
//! labels of `sere visualize`): DejaVu Sans, embedded in the binary
//! (`host/assets/DejaVuSans.ttf`, licence beside it) and rasterised by
//! plotters' pure-Rust `ab_glyph` renderer, so text draws the same on a
//! bare machine without system fonts or font libraries.

use std::sync::OnceLock;

use plotters::style::{FontStyle, IntoFont, TextStyle};

use crate::error::SereError;

/// The family name the font is registered under: plotters' own default
/// (`sans-serif`), so its axis labels use it too.
pub const FAMILY: &str = "sans-serif";

/// DejaVu Sans, the whole TrueType file.
static DEJAVU_SANS: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Registers the embedded font with plotters (once per process; later
/// calls return the first result). Every style maps to the one face, so a
/// bold or italic request never finds no font.
pub fn register() -> Result<(), SereError> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        for style in [
            FontStyle::Normal,
            FontStyle::Bold,
            FontStyle::Italic,
            FontStyle::Oblique,
        ] {
            plotters::style::register_font(FAMILY, style, DEJAVU_SANS)
                .map_err(|_| "the embedded DejaVu Sans font cannot be read".to_string())?;
        }
        Ok(())
    })
    .clone()
    .map_err(SereError::Other)
}

/// The font at `px` pixels, registered first.
pub fn text_style(px: f64) -> Result<TextStyle<'static>, SereError> {
    register()?;
    Ok((FAMILY, px).into_font().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use plotters::prelude::*;

    /// Text drawn with the embedded font leaves ink, and more text more.
    #[test]
    fn embedded_font_draws_text() {
        let style = text_style(14.0).unwrap();
        let ink = |text: &str| {
            let mut buf = vec![255u8; 120 * 24 * 3];
            {
                let root = BitMapBackend::with_buffer(&mut buf, (120, 24)).into_drawing_area();
                root.draw(&Text::new(text, (2, 2), style.clone())).unwrap();
                root.present().unwrap();
            }
            buf.iter().filter(|&&v| v < 128).count()
        };
        assert_eq!(ink(""), 0);
        assert!(ink("head 1") > 20, "{}", ink("head 1"));
        assert!(ink("head 1 mean") > ink("head 1"));
        register().unwrap();
    }
}
