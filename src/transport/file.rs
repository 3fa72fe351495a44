//! JSON lines: one Debezium message per line, in from a file or stdin, out
//! to a file (made durable with fsync) or stdout.

use std::path::Path;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{CapturedEvent, Publisher};

/// Opens `-` as stdin, anything else as a file.
pub async fn open_input(path: &Path) -> std::io::Result<Box<dyn AsyncBufRead + Unpin + Send>> {
    if path == Path::new("-") {
        Ok(Box::new(BufReader::with_capacity(
            1 << 20,
            tokio::io::stdin(),
        )))
    } else {
        let file = tokio::fs::File::open(path).await?;
        Ok(Box::new(BufReader::with_capacity(1 << 20, file)))
    }
}

/// Reads the input in chunks of up to `size` lines, calling `each` per
/// chunk. An empty line is an empty message (Debezium's delete tombstone).
pub async fn for_each_chunk<R, F, Fut>(
    mut reader: R,
    size: usize,
    mut each: F,
) -> std::io::Result<()>
where
    R: AsyncBufRead + Unpin,
    F: FnMut(Vec<String>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut chunk = Vec::with_capacity(size);
    let mut line = String::new();
    loop {
        line.clear();
        let read = reader.read_line(&mut line).await?;
        if read == 0 {
            break;
        }
        let message = line.trim_end_matches(['\n', '\r']).to_string();
        chunk.push(message);
        if chunk.len() == size
            && !each(std::mem::replace(&mut chunk, Vec::with_capacity(size))).await
        {
            return Ok(());
        }
    }
    if !chunk.is_empty() {
        each(chunk).await;
    }
    Ok(())
}

/// JSON lines to a file (made durable with fsync) or to stdout.
pub struct LinesPublisher {
    writer: tokio::io::BufWriter<Box<dyn tokio::io::AsyncWrite + Unpin + Send>>,
    file: Option<tokio::fs::File>,
}

impl LinesPublisher {
    /// `-` is stdout; anything else a file opened for appending.
    pub async fn open(path: &std::path::Path) -> std::io::Result<LinesPublisher> {
        if path == std::path::Path::new("-") {
            return Ok(LinesPublisher {
                writer: tokio::io::BufWriter::with_capacity(1 << 20, Box::new(tokio::io::stdout())),
                file: None,
            });
        }
        drop_torn_last_line(path).await?;
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        let sync_handle = file.try_clone().await?;
        Ok(LinesPublisher {
            writer: tokio::io::BufWriter::with_capacity(1 << 20, Box::new(file)),
            file: Some(sync_handle),
        })
    }
}

/// A crash can leave half a line at the end of the file; it was never
/// confirmed, so it is sent again after restart. Cutting it off keeps it
/// from gluing onto the next event.
async fn drop_torn_last_line(path: &std::path::Path) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = match tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .await
    {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    let length = file.metadata().await?.len();
    let mut end = length;
    let mut buffer = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buffer.len() as u64);
        let chunk = &mut buffer[..(end - start) as usize];
        file.seek(std::io::SeekFrom::Start(start)).await?;
        file.read_exact(chunk).await?;
        if let Some(position) = chunk.iter().rposition(|b| *b == b'\n') {
            end = start + position as u64 + 1;
            break;
        }
        end = start;
    }
    if end < length {
        tracing::warn!(
            "{}: cut a torn last line of {} bytes left by a crash",
            path.display(),
            length - end
        );
        file.set_len(end).await?;
        file.sync_data().await?;
    }
    Ok(())
}

impl Publisher for LinesPublisher {
    async fn publish(&mut self, event: CapturedEvent) -> std::io::Result<()> {
        self.writer.write_all(event.json.as_bytes()).await?;
        self.writer.write_all(b"\n").await
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush().await
    }

    async fn make_durable(&mut self) -> std::io::Result<()> {
        self.writer.flush().await?;
        if let Some(file) = &self.file {
            file.sync_data().await?;
        }
        Ok(())
    }
}
