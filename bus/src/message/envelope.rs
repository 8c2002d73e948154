//! The stored envelope: how a [`Message`] is written to and read from the
//! store (and a NATS payload). Version 1 holds id, birth time, tag, keys,
//! properties and body; version 2, written only when one of its fields is
//! set, adds the message group, the destination of a staged message, the
//! due time and a flags byte (bit 0: the half flag; bits 4-7: the
//! priority). Topic, queue and offset are not in it: they
//! are the record's key.

use super::*;

pub(super) const ENVELOPE_V1: u8 = 1;

/// v1 plus message group, delivery time and destination (written only when
/// one of them is set, so plain messages keep the v1 form).
pub(super) const ENVELOPE_V2: u8 = 2;

pub(super) const NONE_LEN: u32 = u32::MAX;

pub(super) fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

pub(super) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StorageError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(StorageError::msg(format!(
                "message envelope truncated: need {n} bytes at position {} of {}",
                self.pos,
                self.bytes.len()
            ))),
        }
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], StorageError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, StorageError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, StorageError> {
        Ok(u32::from_be_bytes(self.array::<4>()?))
    }
    fn bytes(&mut self) -> Result<&'a [u8], StorageError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, StorageError> {
        let at = self.pos;
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| {
            StorageError::msg(format!(
                "message envelope holds invalid UTF-8 at position {at}"
            ))
        })
    }
    fn opt_string(&mut self) -> Result<Option<String>, StorageError> {
        let save = self.pos;
        if self.u32()? == NONE_LEN {
            return Ok(None);
        }
        self.pos = save;
        self.string().map(Some)
    }
}

impl Message {
    /// An estimate of the bytes the message takes in memory and on disk.
    pub fn size_hint(&self) -> usize {
        64 + self.body.len()
            + self.tag.as_ref().map_or(0, String::len)
            + self.keys.iter().map(|k| k.len() + 4).sum::<usize>()
            + self.message_group.as_ref().map_or(0, |g| g.len() + 20)
            + self.destination.as_ref().map_or(0, |d| d.len() + 4)
            + self
                .properties
                .iter()
                .map(|(k, v)| k.len() + v.len() + 8)
                .sum::<usize>()
    }

    /// Appends the stored envelope (everything but topic, queue and offset,
    /// which the store keeps in its key) to `out`.
    pub fn encode_envelope(&self, out: &mut Vec<u8>) {
        out.reserve(self.size_hint());
        let v2 = self.message_group.is_some()
            || self.deliver_at_ms.is_some()
            || self.destination.is_some()
            || self.half
            || self.priority > 0;
        out.push(if v2 { ENVELOPE_V2 } else { ENVELOPE_V1 });
        out.extend_from_slice(&self.id.0.to_be_bytes());
        out.extend_from_slice(&self.born_at_ms.to_be_bytes());
        match &self.tag {
            Some(t) => put_bytes(out, t.as_bytes()),
            None => out.extend_from_slice(&NONE_LEN.to_be_bytes()),
        }
        out.extend_from_slice(&(self.keys.len() as u32).to_be_bytes());
        for k in &self.keys {
            put_bytes(out, k.as_bytes());
        }
        out.extend_from_slice(&(self.properties.len() as u32).to_be_bytes());
        for (k, v) in &self.properties {
            put_bytes(out, k.as_bytes());
            put_bytes(out, v.as_bytes());
        }
        put_bytes(out, &self.body);
        if v2 {
            for s in [&self.message_group, &self.destination] {
                match s {
                    Some(s) => put_bytes(out, s.as_bytes()),
                    None => out.extend_from_slice(&NONE_LEN.to_be_bytes()),
                }
            }
            out.extend_from_slice(&self.deliver_at_ms.unwrap_or(0).to_be_bytes());
            // Flags: bit 0 the half flag, bits 4-7 the priority.
            out.push(self.half as u8 | (self.priority << 4));
        }
    }

    /// Decodes an envelope written by [`Message::encode_envelope`]; returns
    /// the message and the number of bytes read.
    ///
    /// # Errors
    ///
    /// A [`StorageError`] naming the position if the bytes are truncated,
    /// carry an unknown version, or hold invalid UTF-8.
    pub fn decode_envelope(
        topic: Arc<str>,
        queue: u32,
        offset: u64,
        bytes: &[u8],
    ) -> Result<(Message, usize), StorageError> {
        let mut r = Reader { bytes, pos: 0 };
        let version = r.u8()?;
        if version != ENVELOPE_V1 && version != ENVELOPE_V2 {
            return Err(StorageError::msg(format!(
                "message envelope has unknown version {version} (this build reads versions \
                 {ENVELOPE_V1} and {ENVELOPE_V2})"
            )));
        }
        let id = MessageId(u128::from_be_bytes(r.array::<16>()?));
        let born_at_ms = u64::from_be_bytes(r.array::<8>()?);
        let tag = r.opt_string()?;
        let nkeys = r.u32()? as usize;
        let mut keys = Vec::with_capacity(nkeys.min(1024));
        for _ in 0..nkeys {
            keys.push(r.string()?);
        }
        let nprops = r.u32()? as usize;
        let mut properties = BTreeMap::new();
        for _ in 0..nprops {
            let k = r.string()?;
            let v = r.string()?;
            properties.insert(k, v);
        }
        let body = r.bytes()?.to_vec();
        let (mut message_group, mut destination, mut deliver_at_ms) = (None, None, None);
        let (mut half, mut priority) = (false, 0);
        if version == ENVELOPE_V2 {
            message_group = r.opt_string()?;
            destination = r.opt_string()?;
            deliver_at_ms = Some(u64::from_be_bytes(r.array::<8>()?)).filter(|ms| *ms > 0);
            let flags = r.u8()?;
            half = flags & 1 == 1;
            priority = flags >> 4;
            if flags & 0x0E != 0 || priority > crate::MAX_PRIORITY {
                return Err(StorageError::msg(format!(
                    "message envelope has unknown flags {flags:#04x} (this build knows bit 0, \
                     the half flag, and bits 4-7, a priority of at most {})",
                    crate::MAX_PRIORITY
                )));
            }
        }
        Ok((
            Message {
                id,
                topic,
                queue,
                offset,
                born_at_ms,
                tag,
                keys,
                properties,
                message_group,
                deliver_at_ms,
                destination,
                half,
                priority,
                body,
                dedupe: None,
            },
            r.pos,
        ))
    }
}
