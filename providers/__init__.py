"""Payment provider plugins (banks and wallets). Imports nothing of ``paysvc`` or ``ledger``."""
