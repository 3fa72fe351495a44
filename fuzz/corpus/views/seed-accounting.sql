-- What each customer owes: invoices add, payments subtract. The CASE is a
-- row-level expression, so correcting a document's kind or amount moves the
-- right amount in or out of the balance.
CREATE MATERIALIZED VIEW customer_owed AS
SELECT customer_id,
       SUM(CASE WHEN kind = 'invoice' THEN amount ELSE -amount END) AS owed,
       SUM(amount) FILTER (WHERE kind = 'invoice') AS invoiced,
       SUM(amount) FILTER (WHERE kind = 'payment') AS paid,
       COUNT(*) AS documents
FROM documents
GROUP BY customer_id;

-- Invoiced amount per calendar month, for the revenue chart: the group key
-- is an expression of the document's date.
CREATE MATERIALIZED VIEW monthly_invoiced AS
SELECT to_char(issued_on, 'YYYY-MM') AS month,
       SUM(amount) AS invoiced,
       COUNT(*) AS invoices
FROM documents
WHERE kind = 'invoice'
GROUP BY to_char(issued_on, 'YYYY-MM');
