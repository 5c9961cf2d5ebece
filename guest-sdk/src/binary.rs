//! Binary payloads: a bounds-checked big/little-endian [`Reader`] and hex/base64 helpers.

use base64::Engine as _;

use crate::ScriptError;

/// Reads fixed-size numbers from a byte slice, front to back.
///
/// Every read checks the length and fails with error code
/// `payload-too-short`, naming the offset and how many bytes were needed.
///
/// ```
/// use sluice_guest::Reader;
///
/// let mut r = Reader::new(&[0xCB, 0xF6, 0xFF, 0x38]);
/// assert_eq!(r.u16_be()? & 0x3FFF, 3062);
/// assert_eq!(r.i16_be()?, -200);
/// assert!(r.u8().is_err());
/// # Ok::<(), sluice_guest::ScriptError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

macro_rules! numbers {
    ($($(#[$doc:meta])* $name:ident -> $ty:ty, $from:ident;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(&mut self) -> Result<$ty, ScriptError> {
                let bytes = self.array::<{ std::mem::size_of::<$ty>() }>()?;
                Ok(<$ty>::$from(bytes))
            }
        )*
    };
}

impl<'a> Reader<'a> {
    /// A reader positioned at the first byte of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, position: 0 }
    }

    /// The offset of the next byte to read.
    pub fn position(&self) -> usize {
        self.position
    }

    /// How many bytes are left.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.position
    }

    /// The next `len` bytes.
    pub fn bytes(&mut self, len: usize) -> Result<&'a [u8], ScriptError> {
        if self.remaining() < len {
            return Err(ScriptError::new(
                "payload-too-short",
                format!(
                    "payload too short: need {len} byte(s) at offset {}, {} left",
                    self.position,
                    self.remaining()
                ),
            ));
        }
        let slice = &self.bytes[self.position..self.position + len];
        self.position += len;
        Ok(slice)
    }

    /// Skips `len` bytes.
    pub fn skip(&mut self, len: usize) -> Result<(), ScriptError> {
        self.bytes(len).map(|_| ())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ScriptError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    numbers! {
        /// One unsigned byte.
        u8 -> u8, from_be_bytes;
        /// One signed byte.
        i8 -> i8, from_be_bytes;
        /// Unsigned 16 bits, big-endian.
        u16_be -> u16, from_be_bytes;
        /// Signed 16 bits, big-endian.
        i16_be -> i16, from_be_bytes;
        /// Unsigned 32 bits, big-endian.
        u32_be -> u32, from_be_bytes;
        /// Signed 32 bits, big-endian.
        i32_be -> i32, from_be_bytes;
        /// Unsigned 64 bits, big-endian.
        u64_be -> u64, from_be_bytes;
        /// IEEE 754 single precision, big-endian.
        f32_be -> f32, from_be_bytes;
        /// IEEE 754 double precision, big-endian.
        f64_be -> f64, from_be_bytes;
        /// Unsigned 16 bits, little-endian.
        u16_le -> u16, from_le_bytes;
        /// Signed 16 bits, little-endian.
        i16_le -> i16, from_le_bytes;
        /// Unsigned 32 bits, little-endian.
        u32_le -> u32, from_le_bytes;
        /// Signed 32 bits, little-endian.
        i32_le -> i32, from_le_bytes;
        /// Unsigned 64 bits, little-endian.
        u64_le -> u64, from_le_bytes;
        /// IEEE 754 single precision, little-endian.
        f32_le -> f32, from_le_bytes;
        /// IEEE 754 double precision, little-endian.
        f64_le -> f64, from_le_bytes;
    }
}

/// Lower-case hex of `bytes`, two digits a byte.
pub fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0F)]));
    }
    out
}

/// The bytes of a hex string (either case; spaces between bytes allowed);
/// error code `invalid-hex`.
pub fn hex_decode(text: &str) -> Result<Vec<u8>, ScriptError> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return Err(ScriptError::new(
            "invalid-hex",
            format!("hex text has an odd number of digits ({})", digits.len()),
        ));
    }
    digits
        .chunks(2)
        .enumerate()
        .map(|(i, pair)| {
            let nibble = |d: u8| char::from(d).to_digit(16);
            match (nibble(pair[0]), nibble(pair[1])) {
                (Some(hi), Some(lo)) => Ok((hi * 16 + lo) as u8),
                _ => Err(ScriptError::new(
                    "invalid-hex",
                    format!("hex text has a non-hex digit in byte {i}"),
                )),
            }
        })
        .collect()
}

/// The bytes of standard base64 text (with padding, as LoRaWAN network
/// servers send it); error code `invalid-base64`.
pub fn base64_decode(text: &str) -> Result<Vec<u8>, ScriptError> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| ScriptError::new("invalid-base64", format!("payload data is not base64: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_byte_orders() {
        let mut r = Reader::new(&[0x01, 0x02, 0x01, 0x02, 0xFF, 0xFE]);
        assert_eq!(r.u16_be().unwrap(), 0x0102);
        assert_eq!(r.u16_le().unwrap(), 0x0201);
        assert_eq!(r.i16_be().unwrap(), -2);
        assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn short_payloads_name_offset_and_need() {
        let mut r = Reader::new(&[1, 2, 3]);
        r.u8().unwrap();
        let err = r.u32_be().unwrap_err();
        assert_eq!(err.code, "payload-too-short");
        assert_eq!(
            err.message,
            "payload too short: need 4 byte(s) at offset 1, 2 left"
        );
        assert_eq!(r.position(), 1, "a failed read does not move the reader");
    }

    #[test]
    fn hex_round_trips() {
        let bytes = hex_decode("CB F6 0b0d").unwrap();
        assert_eq!(bytes, [0xCB, 0xF6, 0x0B, 0x0D]);
        assert_eq!(hex_encode(&bytes), "cbf60b0d");
        assert_eq!(hex_decode("abc").unwrap_err().code, "invalid-hex");
        assert_eq!(hex_decode("zz").unwrap_err().code, "invalid-hex");
    }

    #[test]
    fn base64_decodes_lorawan_data() {
        assert_eq!(
            base64_decode("y/YLDQN2AQrdf/8=").unwrap(),
            [
                0xCB, 0xF6, 0x0B, 0x0D, 0x03, 0x76, 0x01, 0x0A, 0xDD, 0x7F, 0xFF
            ]
        );
        assert_eq!(base64_decode("%%").unwrap_err().code, "invalid-base64");
    }
}
