-- Words and paragraphs per article, as the article page shows them.
--
-- The word count is an ordinary Postgres expression, evaluated by Postgres
-- for each paragraph version: trim the body, split it on runs of
-- whitespace, count the pieces. The WHERE clause keeps visible paragraphs
-- that have at least one non-whitespace character (`~ '\S'` is false for
-- '', '   ' and a lone newline, and NULL for a NULL body), so a blank
-- paragraph neither counts as a paragraph nor as a word.
CREATE MATERIALIZED VIEW article_words AS
SELECT article_id,
       SUM(COALESCE(array_length(regexp_split_to_array(btrim(body, E' \t\r\n'), '\s+'), 1), 0)) AS words,
       COUNT(*) AS paragraphs
FROM paragraphs
WHERE deleted_at IS NULL AND body ~ '\S'
GROUP BY article_id;
