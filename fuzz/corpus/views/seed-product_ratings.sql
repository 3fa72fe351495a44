-- Ratings per product. AVG and COUNT(stars) skip NULL stars, COUNT(*) does
-- not: `rated` of `ratings` reviews carry stars, and `average` is their mean
-- (NULL while none does). Tally keeps the sum and the count of stars and
-- divides them the way Postgres's AVG does, so `average` has the same
-- digits as the query's. `shown` is what the product page prints.
CREATE MATERIALIZED VIEW product_rating AS
SELECT product_id,
       AVG(stars) AS average,
       ROUND(AVG(stars), 1) AS shown,
       COUNT(stars) AS rated,
       COUNT(*) AS ratings
FROM ratings
GROUP BY product_id;
