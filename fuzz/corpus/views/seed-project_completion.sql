-- Progress per project: tasks done, tasks in all, and the share done.
--
-- `completion` is an expression over two aggregates; Tally keeps the two
-- counts and derives the ratio from them, so it is exact after any order of
-- events (a ratio cannot be maintained by adding deltas to itself).
-- `hours_left` sums the estimates of the tasks not done yet; estimates that
-- are NULL are skipped, as SUM skips them.
CREATE MATERIALIZED VIEW project_progress AS
SELECT project_id,
       COUNT(*) FILTER (WHERE status = 'done') AS done,
       COUNT(*) AS tasks,
       ROUND(COUNT(*) FILTER (WHERE status = 'done')::numeric / COUNT(*), 4) AS completion,
       SUM(estimate_hours) FILTER (WHERE status <> 'done') AS hours_left
FROM tasks
GROUP BY project_id;
