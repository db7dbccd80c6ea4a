-- A card transaction refunded after the fact (the only change a transaction sees).
UPDATE card_transactions SET status = ?, updated_at = ? WHERE transaction_id = ?
