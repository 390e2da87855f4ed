//! Big-endian wire fields (NBD on both sides, the QCOW2 header), read
//! without panics.
//!
//! [`Reader`] takes fields off the front of a byte slice. Every read is
//! checked: a short or hostile input gives a [`WireError`], never a panic,
//! and a failed read leaves the reader where it was.
//!
//! Writing needs no helper of its own: [`bytes::BufMut`]'s `put_u16`,
//! `put_u32`, `put_u64` and `put_slice` are big endian already. A
//! fixed-size array (a header taken with `read_exact`) may be read with
//! [`bytes::Buf`] directly, as its type fixes its length; anything whose
//! length the peer chose goes through a [`Reader`].

/// A field ran past the end of the input, or bytes were left after the
/// last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A field needs more bytes than are left.
    #[error("needs {want} more bytes, {left} left")]
    Short {
        /// Size of the field.
        want: usize,
        /// Bytes that were left.
        left: usize,
    },
    /// Bytes after the last field.
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

/// A checked big-endian reader over a byte slice.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    /// How many bytes are not read yet.
    pub fn remaining(&self) -> usize {
        self.data.len()
    }

    /// The bytes not read yet (the reader stays where it is).
    pub fn rest(&self) -> &'a [u8] {
        self.data
    }

    /// The next `n` bytes.
    ///
    /// # Errors
    /// Fewer than `n` bytes are left.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let data = self.data;
        let Some((head, rest)) = data.split_at_checked(n) else {
            return Err(WireError::Short {
                want: n,
                left: data.len(),
            });
        };
        self.data = rest;
        Ok(head)
    }

    /// Skip the next `n` bytes.
    ///
    /// # Errors
    /// Fewer than `n` bytes are left.
    pub fn skip(&mut self, n: usize) -> Result<(), WireError> {
        self.bytes(n).map(|_| ())
    }

    /// The next `N` bytes as an array.
    ///
    /// # Errors
    /// Fewer than `N` bytes are left.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let data = self.data;
        let Some((head, rest)) = data.split_first_chunk::<N>() else {
            return Err(WireError::Short {
                want: N,
                left: data.len(),
            });
        };
        self.data = rest;
        Ok(*head)
    }

    /// A big-endian `u16`.
    ///
    /// # Errors
    /// Fewer than 2 bytes are left.
    pub fn u16(&mut self) -> Result<u16, WireError> {
        self.array::<2>().map(u16::from_be_bytes)
    }

    /// A big-endian `u32`.
    ///
    /// # Errors
    /// Fewer than 4 bytes are left.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        self.array::<4>().map(u32::from_be_bytes)
    }

    /// A big-endian `u64`.
    ///
    /// # Errors
    /// Fewer than 8 bytes are left.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        self.array::<8>().map(u64::from_be_bytes)
    }

    /// The end of the input: every byte was read.
    ///
    /// # Errors
    /// Bytes are left.
    pub fn finish(self) -> Result<(), WireError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.data.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A u16, a u32, a u64, then 3 bytes: 17 bytes.
    fn fields(r: &mut Reader<'_>) -> Result<(u16, u32, u64, Vec<u8>), WireError> {
        Ok((r.u16()?, r.u32()?, r.u64()?, r.bytes(3)?.to_vec()))
    }

    #[test]
    fn exact_values_in_order() {
        let full: Vec<u8> = (1..=17).collect();
        let mut r = Reader::new(&full);
        assert_eq!(
            fields(&mut r).unwrap(),
            (
                0x0102,
                0x0304_0506,
                0x0708_090a_0b0c_0d0e,
                vec![0x0f, 0x10, 0x11]
            )
        );
        assert_eq!(r.remaining(), 0);
        assert_eq!(r.finish(), Ok(()));

        let b = [0xff_u8, 0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2];
        let mut r = Reader::new(&b);
        assert_eq!(r.u16(), Ok(0xfffe));
        assert_eq!(r.u64(), Ok(0x8000_0000_0000_0000));
        assert_eq!(r.rest(), &[1_u8, 2][..]);
        assert_eq!(r.array::<2>(), Ok([1, 2]));
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn short_input_at_every_field() {
        let full: Vec<u8> = (1..=17).collect();
        // Where each field of `fields` starts, and the end.
        let starts = [0, 2, 6, 14, 17];
        for cut in 0..full.len() {
            let mut r = Reader::new(&full[..cut]);
            let e = fields(&mut r).unwrap_err();
            // The field that runs short starts at the last start <= cut;
            // it consumed nothing.
            let i = starts.iter().rposition(|&s| s <= cut).unwrap();
            let (start, want) = (starts[i], starts[i + 1] - starts[i]);
            assert_eq!(
                e,
                WireError::Short {
                    want,
                    left: cut - start
                },
                "cut at {cut}"
            );
            assert_eq!(r.remaining(), cut - start, "cut at {cut}");
        }
    }

    #[test]
    fn trailing_bytes_and_huge_lengths() {
        let mut r = Reader::new(&[0, 1, 2]);
        assert_eq!(r.u16(), Ok(1));
        assert_eq!(r.clone().finish(), Err(WireError::Trailing(1)));
        assert_eq!(
            r.bytes(usize::MAX),
            Err(WireError::Short {
                want: usize::MAX,
                left: 1
            })
        );
        assert_eq!(r.skip(2), Err(WireError::Short { want: 2, left: 1 }));
        assert_eq!(r.u32(), Err(WireError::Short { want: 4, left: 1 }));
        assert_eq!(r.remaining(), 1);
        assert_eq!(r.skip(1), Ok(()));
        assert_eq!(r.u16(), Err(WireError::Short { want: 2, left: 0 }));
        assert_eq!(r.bytes(0), Ok(&[][..]));
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn messages() {
        assert_eq!(
            WireError::Short { want: 4, left: 2 }.to_string(),
            "needs 4 more bytes, 2 left"
        );
        assert_eq!(WireError::Trailing(3).to_string(), "3 trailing bytes");
    }

    /// Property-style (no proptest here): random inputs and random reads,
    /// sizes up to `usize::MAX`. No read panics, and a read moves the
    /// reader by exactly its size when it succeeds, not at all otherwise.
    #[test]
    fn arbitrary_reads_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..5000 {
            let len = (next() % 48) as usize;
            let input: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let mut r = Reader::new(&input);
            for _ in 0..16 {
                let before = r.remaining();
                let (size, ok) = match next() % 7 {
                    0 => (2, r.u16().is_ok()),
                    1 => (4, r.u32().is_ok()),
                    2 => (8, r.u64().is_ok()),
                    3 => (3, r.array::<3>().is_ok()),
                    4 => (usize::MAX, r.skip(usize::MAX).is_ok()),
                    5 => {
                        let n = (next() % 40) as usize;
                        (n, r.skip(n).is_ok())
                    }
                    _ => {
                        let n = (next() % 40) as usize;
                        let got = r.bytes(n);
                        if let Ok(b) = got {
                            assert_eq!(b.len(), n);
                        }
                        (n, got.is_ok())
                    }
                };
                assert_eq!(ok, size <= before);
                assert_eq!(r.remaining(), if ok { before - size } else { before });
            }
            assert_eq!(r.clone().finish().is_ok(), r.remaining() == 0);
        }
    }
}
