-- A user passing eKYC or closing the account.
UPDATE users SET identity_verified_at = ?, status = ?, updated_at = ? WHERE user_id = ?
