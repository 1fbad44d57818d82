//! Whole numbers as JavaScript clients put them on the wire.
//!
//! TopGun's TypeScript client serialises with msgpackr, which writes an integer in
//! `0..=2^32-1` as a MsgPack unsigned integer but **every larger integer as a float64**
//! (`0xcb`): HLC `millis`, `Date.now()` in a `PING`, any counter past four billion. A plain
//! `u64` field refuses a float64, so a Rust server built with `#[derive(Deserialize)]` alone
//! cannot read what the client sends. These functions accept both forms and refuse what is not
//! a whole number in range, with a message that says why.
//!
//! | on the wire | accepted when |
//! |---|---|
//! | any MsgPack integer width | it fits the target type (not negative, not too large) |
//! | float32 / float64 | it is finite, has no fractional part, is not negative, fits the target type, and for `u64` is at most 2^53 - 1 (a larger float no longer holds an exact JavaScript integer) |
//!
//! Use them on your own message types with `deserialize_with`:
//!
//! ```
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Ping {
//!     #[serde(deserialize_with = "topgun_core::number::deserialize_u64")]
//!     timestamp: u64,
//! }
//!
//! // {type: 'PING', timestamp: 1796023824376} exactly as the client's serializer writes it.
//! let frame = b"\xde\x00\x02\xa4type\xa4PING\xa9timestamp\xcb\x42\x7a\x22\xb5\xca\xff\x80\x00";
//! let ping: Ping = rmp_serde::from_slice(frame).unwrap();
//! assert_eq!(ping.timestamp, 1_796_023_824_376);
//! ```

use std::fmt;
use std::marker::PhantomData;

use serde::Deserializer;
use serde::de::{self, Unexpected, Visitor};

/// The largest integer a JavaScript number (an IEEE 754 double) holds exactly: 2^53 - 1.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Reads a `u64` written as any MsgPack integer or as a float holding a whole number up to
/// [`MAX_SAFE_INTEGER`].
///
/// # Errors
///
/// The deserializer's error for a negative, fractional, non-finite or out-of-range number, or a
/// value that is not a number.
pub fn deserialize_u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    deserializer.deserialize_any(WholeNumber::<u64>(PhantomData))
}

/// Reads a `u32` written as any MsgPack integer or as a float holding a whole number.
///
/// # Errors
///
/// The deserializer's error for a negative, fractional, non-finite or out-of-range number, or a
/// value that is not a number.
pub fn deserialize_u32<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    deserializer.deserialize_any(WholeNumber::<u32>(PhantomData))
}

/// The unsigned types [`WholeNumber`] produces, with the largest float each accepts.
trait Target: TryFrom<u64> + Sized {
    const NAME: &'static str;
    const MAX_FROM_FLOAT: u64;
}

impl Target for u64 {
    const NAME: &'static str = "a whole number from 0 to 2^64-1 (as a float: at most 2^53-1)";
    const MAX_FROM_FLOAT: u64 = MAX_SAFE_INTEGER;
}

impl Target for u32 {
    const NAME: &'static str = "a whole number from 0 to 2^32-1";
    const MAX_FROM_FLOAT: u64 = u32::MAX as u64;
}

struct WholeNumber<T>(PhantomData<T>);

impl<T: Target> Visitor<'_> for WholeNumber<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(T::NAME)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<T, E> {
        T::try_from(value).map_err(|_| E::invalid_value(Unexpected::Unsigned(value), &self))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<T, E> {
        u64::try_from(value)
            .ok()
            .and_then(|value| T::try_from(value).ok())
            .ok_or_else(|| E::invalid_value(Unexpected::Signed(value), &self))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<T, E> {
        #[allow(clippy::cast_precision_loss)] // both limits are exact in f64
        let in_range = value >= 0.0 && value <= T::MAX_FROM_FLOAT as f64;
        if !(value.is_finite() && value.fract() == 0.0 && in_range) {
            return Err(E::invalid_value(Unexpected::Float(value), &self));
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // checked above
        let whole = value as u64;
        T::try_from(whole).map_err(|_| E::invalid_value(Unexpected::Float(value), &self))
    }

    fn visit_f32<E: de::Error>(self, value: f32) -> Result<T, E> {
        self.visit_f64(f64::from(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Wide(#[serde(deserialize_with = "deserialize_u64")] u64);

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Narrow(#[serde(deserialize_with = "deserialize_u32")] u32);

    fn wide(bytes: &[u8]) -> Result<u64, String> {
        rmp_serde::from_slice::<Wide>(bytes).map(|w| w.0).map_err(|e| e.to_string())
    }

    fn narrow(bytes: &[u8]) -> Result<u32, String> {
        rmp_serde::from_slice::<Narrow>(bytes).map(|n| n.0).map_err(|e| e.to_string())
    }

    fn float64(value: f64) -> Vec<u8> {
        let mut bytes = vec![0xcb];
        bytes.extend_from_slice(&value.to_be_bytes());
        bytes
    }

    #[test]
    fn every_integer_width_is_read() {
        assert_eq!(wide(&[0x07]), Ok(7)); // positive fixint
        assert_eq!(wide(&[0xcc, 0xff]), Ok(255)); // uint8
        assert_eq!(wide(&[0xcd, 0x01, 0x00]), Ok(256)); // uint16
        assert_eq!(wide(&[0xce, 0xff, 0xff, 0xff, 0xff]), Ok(u64::from(u32::MAX))); // uint32
        assert_eq!(wide(&[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]), Ok(u64::MAX));
        assert_eq!(wide(&[0xd0, 0x05]), Ok(5)); // int8 holding a positive value
        assert_eq!(wide(&[0xd3, 0, 0, 0, 0, 0, 0, 0, 9]), Ok(9)); // int64
        assert_eq!(narrow(&[0xce, 0xff, 0xff, 0xff, 0xff]), Ok(u32::MAX));
    }

    #[test]
    fn floats_holding_whole_numbers_are_read() {
        // HLC millis exactly as TopGun's client serializer writes Date.now().
        assert_eq!(
            wide(&[0xcb, 0x42, 0x7a, 0x22, 0xb5, 0xca, 0xff, 0x80, 0x00]),
            Ok(1_796_023_824_376)
        );
        assert_eq!(wide(&float64(0.0)), Ok(0));
        #[allow(clippy::cast_precision_loss)]
        let max_safe = MAX_SAFE_INTEGER as f64;
        assert_eq!(wide(&float64(max_safe)), Ok(MAX_SAFE_INTEGER));
        assert_eq!(narrow(&float64(4_294_967_295.0)), Ok(u32::MAX));
        assert_eq!(narrow(&[0xca, 0x40, 0x40, 0x00, 0x00]), Ok(3)); // float32 3.0
    }

    #[test]
    fn fractional_negative_non_finite_and_out_of_range_values_are_refused() {
        let refused = [
            (wide(&float64(1.5)), "floating point `1.5`"),
            (wide(&float64(-1.0)), "floating point `-1.0`"),
            (wide(&float64(f64::NAN)), "floating point `NaN`"),
            (wide(&float64(f64::INFINITY)), "floating point `inf`"),
            (wide(&float64(9_007_199_254_740_992.0)), "floating point `9007199254740992.0`"),
            (wide(&[0xff]), "integer `-1`"), // negative fixint
            (wide(&[0xa1, b'1']), "string \"1\""),
            (narrow(&float64(4_294_967_296.0)).map(u64::from), "floating point `4294967296.0`"),
            (narrow(&[0xcf, 0, 0, 0, 1, 0, 0, 0, 0]).map(u64::from), "integer `4294967296`"),
        ];
        for (result, unexpected) in refused {
            let message = result.expect_err(unexpected);
            assert!(message.contains(unexpected), "{message}");
            assert!(message.contains("a whole number"), "{message}");
        }
    }
}
