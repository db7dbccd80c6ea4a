-- A deferred charge repaid (on time, late, after default) or marked defaulted after the grace period.
UPDATE deferred_charges SET status = ?, repaid_at = ?, days_late = ?, updated_at = ? WHERE charge_id = ?
