CREATE MATERIALIZED VIEW customer_balance AS
SELECT customer_id, SUM(amount) AS balance, COUNT(*) AS movements,
       AVG(amount) FILTER (WHERE kind = 'credit') AS avg_credit,
       ROUND(COUNT(done)::numeric / COUNT(*), 4) AS ratio
FROM public.movements
WHERE voided_at IS NULL
GROUP BY customer_id, date_trunc('day', created_at);
CREATE MATERIALIZED VIEW "Quoted View" AS
SELECT "Weird Col", COUNT(*) FROM "Odd Table" GROUP BY 1;
