-- Articles are made of paragraphs; the editor soft-deletes a paragraph by
-- setting deleted_at, and saves a paragraph being written with an empty
-- (or NULL) body.
CREATE TABLE paragraphs (
    id          bigint PRIMARY KEY,
    article_id  int NOT NULL,
    position    int NOT NULL,
    body        text,
    deleted_at  timestamptz               -- soft delete: NULL while visible
);
