-- The sum of every invoice: a view without GROUP BY holds exactly one row.
-- `invoices` counts them; `total` is NULL while there are no invoices,
-- exactly as SUM over no rows is in Postgres.
CREATE MATERIALIZED VIEW invoice_total AS
SELECT SUM(total) AS total, COUNT(*) AS invoices
FROM invoices;

-- Total and number of invoices per customer. Invoices without a customer
-- are grouped under customer_id NULL, as GROUP BY does; a customer whose
-- last invoice is deleted (or moved to another customer) disappears.
CREATE MATERIALIZED VIEW customer_totals AS
SELECT customer_id, SUM(total) AS total, COUNT(*) AS invoices
FROM invoices
GROUP BY customer_id;
