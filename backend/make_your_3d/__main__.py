from make_your_3d.cli import main

raise SystemExit(main())
