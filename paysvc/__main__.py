from paysvc.cli import main

raise SystemExit(main())
