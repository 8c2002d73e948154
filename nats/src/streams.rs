//! Reading and making JetStream streams: the system streams, raw reads by
//! subject, counts. Shared by every role.

use crate::prelude::*;

impl Inner {
    /// Creates a system stream unless it exists (another process may be
    /// creating it at the same time).
    pub(crate) async fn system_stream(
        &self,
        name: &str,
        subjects: &str,
        per_subject: i64,
    ) -> Result<(), String> {
        if self.js.get_stream(name).await.is_ok() {
            return Ok(());
        }
        let config = stream::Config {
            name: name.to_string(),
            subjects: vec![subjects.to_string()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            max_messages_per_subject: per_subject,
            num_replicas: self.replicas,
            description: Some("weirmq system stream".into()),
            ..Default::default()
        };
        match self.js.create_stream(config).await {
            Ok(_) => Ok(()),
            Err(e) => {
                // Another process may have created it meanwhile.
                if self.js.get_stream(name).await.is_ok() {
                    Ok(())
                } else {
                    Err(e.to_string())
                }
            }
        }
    }

    /// A stream by name.
    pub(crate) async fn stream(&self, name: &str) -> Result<stream::Stream, Error> {
        self.js
            .get_stream(name)
            .await
            .map_err(|e| nats_err(format!("opening stream {name}"), e))
    }

    /// Up to `max` messages of `stream` matching `filter`, from sequence
    /// `from`, raw.
    pub(crate) async fn read_raw(
        &self,
        stream: &stream::Stream,
        filter: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<jetstream::message::StreamMessage>, Error> {
        let mut out = Vec::new();
        let mut seq = from.max(1);
        while out.len() < max {
            match stream
                .raw_message_builder()
                .sequence(seq)
                .next_by_subject(filter.to_string())
                .send()
                .await
            {
                Ok(m) => {
                    seq = m.sequence + 1;
                    out.push(m);
                }
                Err(e) if is_not_found(&e) => break,
                Err(e) => return Err(nats_err(format!("reading {filter}"), e)),
            }
        }
        Ok(out)
    }

    /// How many messages of `stream` match `filter`.
    pub(crate) async fn subject_count(&self, stream: &str, filter: &str) -> Result<u64, Error> {
        use futures::TryStreamExt;
        let s = self.stream(stream).await?;
        let mut info = s
            .info_with_subjects(filter)
            .await
            .map_err(|e| nats_err(format!("counting {filter}"), e))?;
        let mut total = 0;
        while let Some((_, n)) = info
            .try_next()
            .await
            .map_err(|e| nats_err(format!("counting {filter}"), e))?
        {
            total += n as u64;
        }
        Ok(total)
    }
}

pub(crate) fn is_not_found(e: &jetstream::stream::RawMessageError) -> bool {
    use jetstream::stream::RawMessageErrorKind as K;
    match e.kind() {
        K::NoMessageFound => true,
        K::JetStream(js) => {
            js.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND || js.code() == 404
        }
        _ => false,
    }
}
