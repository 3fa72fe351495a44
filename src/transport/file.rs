//! JSON lines in: one Debezium message per line, from a file or stdin.

use std::path::Path;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

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
